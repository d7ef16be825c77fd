"""The MLflow model's class under its first name, for models logged before the move to inference/.

A logged pyfunc model names its class by module: a model logged by gmeta before the package
was laid out by role names ``gmeta.pyfunc.GMetaModel``. In a fresh process MLflow imports
the copy of gmeta logged with the model and finds it there; in a process that has imported
gmeta already, the name is looked up here and finds the current class, which reads the
same checkpoint (``gmeta.inference.pyfunc``).
"""

from gmeta.inference.pyfunc import GMetaModel

__all__ = ["GMetaModel"]
