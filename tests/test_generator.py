"""The id generator of new ids' rows (Meta-Embedding): its config errors, its objective
against a per-id reference in float64, and that every path (plain forward, meta step,
scoring, zero-shot tasks) starts a new id from the same generated row."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from gmeta.config import ConfigError, load_config
from gmeta.inference.serving import steps_for_batch
from gmeta.io.reader import TaskReader
from gmeta.layout import layout_of
from gmeta.meta.generator import generator_terms
from gmeta.models.dlrm import build_model, lookup_rows
from gmeta.scoring import predict_queries, predict_query
from gmeta.training.step import meta_step
from gmeta.types import TaskBatch
from tests.conftest import DEBUG_CONFIG
from tests.support.reference import task_query_losses

SMALL = ["model.embedding_dim=4", "model.dense_arch=[6]", "model.over_arch=[5]",
         "features.sparse.ad_id.min_count=1", "generator.feature=ad_id", "generator.hidden=[3]"]


@pytest.mark.parametrize("overrides, match", [
    (["generator.feature=ad"], r"generator.feature: must name a sparse feature .* got 'ad'"),
    (["generator.feature=interests", "generator.attributes=[advertiser_id]"],
     r"generator.feature: interests is multi_hot"),
    (["generator.feature=ad_id", "generator.attributes=[advertiser_id]"],
     r"generator.feature: ad_id has no default row.*features.sparse.ad_id.min_count"),
    (["features.sparse.ad_id.min_count=1", "generator.feature=ad_id"], r"generator.attributes: name at least one"),
    (["features.sparse.ad_id.min_count=1", "generator.feature=ad_id", "generator.attributes=[ad_id]"],
     r"generator.attributes\[0\]: ad_id is generator.feature itself"),
    (["features.sparse.ad_id.min_count=1", "generator.feature=ad_id", "generator.attributes=[advertiser]"],
     r"generator.attributes\[0\]: must name a sparse feature"),
    (["features.sparse.ad_id.min_count=1", "generator.feature=ad_id",
      "generator.attributes=[advertiser_id, advertiser_id]"], r"generator.attributes: names repeat"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.cold_weight=1.5"], r"generator.cold_weight: must be in \[0, 1\]"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.warmup_lr=0"], r"generator.warmup_lr: must be > 0"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.hidden=[0]"], r"generator.hidden: layer sizes must be >= 1"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.mode=base_fixed"], r"train.init_from: generator.mode base_fixed .* name its checkpoint"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.mode=base_fixed", "train.init_from=x", "train.pretrain_epochs=1"], r"train.pretrain_epochs: .* 0"),
    (["features.sparse.ad_id.holdout_share=0.2", "generator.feature=ad_id", "generator.attributes=[advertiser_id]",
      "generator.mode=base_fixed", "train.init_from=x", "generator.offset_ids=all"],
     r"generator.offset_ids: 'all' needs generator.mode joint"),
    (["generator.offset_ids=all"], r"generator.feature: empty \(no generator\), but generator.offset_ids"),
    (["generator.attributes=[advertiser_id]"], r"generator.feature: empty \(no generator\), but generator.attributes"),
    (["generator.mode=fixed"], r"generator.mode: expected one of 'joint', 'base_fixed'"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEBUG_CONFIG, overrides)


def _setup(debug_data, attributes: str = "[advertiser_id]", known_share: float = 0.5, extra: tuple = ()):
    cfg = load_config(DEBUG_CONFIG, SMALL + [f"generator.attributes={attributes}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(2)
    known = torch.rand(model.default_rows.default["ad_id"], generator=gen) < known_share
    model.set_known_ids({"ad_id": known})
    assert model.generator is not None
    with torch.no_grad():  # a generator that has learned something (a fresh one outputs zeros)
        for p in model.generator.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    batch = next(iter(TaskReader(debug_data["shards"], "train", 5, shuffle=False)))
    return cfg, model, batch, known


def _row_ids(batch: TaskBatch) -> dict[str, list[list[int]]]:
    per = batch.sparse.to_dict()
    return {n: [t.tolist() for t in jt.to_dense()] for n, jt in per.items()}


def _reference_terms(head, gen, tables, known, features, batch, lr: float):
    """Meta-Embedding's two terms, id by id (Python loops, float64): each new ad id's row is
    the default row plus the generator of the attribute cells of the first row of the batch
    holding it; per (task, id) one SGD step on the mean loss of its support rows."""
    ids = _row_ids(batch)
    names = [f["name"] for f in features]
    s_total, r_total = batch.num_support, batch.num_rows
    dense, labels = batch.dense.double(), batch.labels.double()
    so, qo = batch.support_offsets.tolist(), batch.query_offsets.tolist()
    task_of = [t for t in range(batch.num_tasks) for _ in range(so[t], so[t + 1])] + \
        [t for t in range(batch.num_tasks) for _ in range(qo[t], qo[t + 1])]

    def cell(name, r):
        rows = [i if name != "ad_id" or known[i] else tables["ad_id"].shape[0] - 1 for i in ids[name][r]]
        v = tables[name][rows].sum(0)
        pooling = features[names.index(name)]["pooling"]
        return v / max(len(rows), 1) if pooling == "mean" else v

    def loss(r, ad_row):
        pooled = torch.stack([ad_row if n == "ad_id" and ad_row is not None else cell(n, r) for n in names])
        logit = head(dense[r:r + 1], pooled.unsqueeze(0))
        return F.binary_cross_entropy_with_logits(logit, labels[r:r + 1])

    generated = {}
    for r in range(r_total):
        a = ids["ad_id"][r][0]
        if not known[a] and a not in generated:
            x = torch.cat([cell(n, r) for n in gen.attr_names])
            generated[a] = tables["ad_id"][-1] + gen(x)
    cold = sum(loss(r, generated[ids["ad_id"][r][0]]) for r in range(s_total) if not known[ids["ad_id"][r][0]])
    warm = 0.0
    for t in range(batch.num_tasks):
        for a, e in generated.items():
            s_rows = [r for r in range(so[t], so[t + 1]) if ids["ad_id"][r][0] == a]
            q_rows = [s_total + r for r in range(qo[t], qo[t + 1]) if ids["ad_id"][s_total + r][0] == a]
            if s_rows:
                mean = sum(loss(r, e) for r in s_rows) / len(s_rows)
                (g,) = torch.autograd.grad(mean, e, create_graph=True)
                e = e - lr * g
            for r in q_rows:
                warm = warm + loss(r, e)
    assert task_of  # (rows belong to tasks; the reference needs no more of it)
    return cold / s_total, warm / (r_total - s_total), len(generated)


@pytest.mark.parametrize("attributes", ["[advertiser_id]", "[advertiser_id, interests]"])
def test_objective_matches_a_per_id_reference_in_float64(debug_data, attributes):
    cfg, model, batch, known = _setup(debug_data, attributes)
    head = copy.deepcopy(model.head).double()
    gen = copy.deepcopy(model.generator).double()
    layout = layout_of(batch, model.pooling, 2)
    batch.dense, batch.labels = batch.dense.double(), batch.labels.double()
    per = model.table_ids(layout).to_dict()
    tables = {f["name"]: (torch.randn(f["num_embeddings"] + int(f["name"] == "ad_id"), 4, dtype=torch.float64)
                          * 0.3).requires_grad_() for f in model.features}
    emb = {n: JaggedTensor(values=tables[n][per[n].values()], lengths=per[n].lengths()) for n in tables}
    rows = lookup_rows(emb, model.features)
    generated, new = gen.generated_rows(rows, layout, known)
    lr, w = 0.8, 0.3
    t = generator_terms(head, generated, new, batch, layout, 1, warmup_lr=lr)
    loss = w * t["cold"] + (1 - w) * t["warm"]

    names = [f["name"] for f in model.features]
    gen.attr_names = [names[i] for i in gen.attributes]
    cold, warm, n_new = _reference_terms(head, gen, tables, known, model.features, batch, lr)
    assert n_new >= 3 and int(new.sum()) == n_new  # several new ads, each generated once
    torch.testing.assert_close(t["cold"], cold, rtol=0, atol=1e-12)
    torch.testing.assert_close(t["warm"], warm, rtol=0, atol=1e-12)
    assert float(t["cold"]) > 0 and float(t["warm"]) > 0
    wrt = list(gen.parameters()) + list(head.parameters()) + list(tables.values())
    got = torch.autograd.grad(loss, wrt)
    want = torch.autograd.grad(w * cold + (1 - w) * warm, wrt)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    assert all(float(g.abs().sum()) > 0 for g in got[: len(list(gen.parameters()))])  # every generator tensor learns


def _zeroed(model):
    """The same model with the generator's output at zero: new ids start from the default row."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        out = other.generator.mlp[-1]
        out.weight.zero_()
        out.bias.zero_()
    return other


@pytest.mark.parametrize("offset_ids", ["new", "all"])
def test_forward_scoring_and_the_meta_step_start_a_new_id_from_the_same_generated_row(debug_data, offset_ids):
    """A new id scores from its generated row on every path (plain forward, scoring, the ERM
    step); a known id from its own row, or with generator.offset_ids all, its own row + the
    offset (its scores move with the generator too)."""
    cfg, model, batch, known = _setup(debug_data, extra=("meta.algorithm=erm", "generator.cold_weight=0",
                                                         f"generator.offset_ids={offset_ids}"))
    assert model.generator is not None and model.generator.every_id == (offset_ids == "all")
    ids = _row_ids(batch)
    adv = {}
    for a, v in zip(ids["ad_id"], ids["advertiser_id"]):
        assert adv.setdefault(a[0], v[0]) == v[0]  # one advertiser per ad: every row generates the same row
    s = batch.num_support
    with torch.no_grad():
        plain = model(batch.sparse, batch.dense)
        without = _zeroed(model)(batch.sparse, batch.dense)
    new_rows = torch.tensor([not known[a[0]] for a in ids["ad_id"]])
    assert 0 < int(new_rows.sum()) < len(new_rows)
    assert not torch.allclose(plain[new_rows], without[new_rows])  # the generator changes new ids' scores ...
    if offset_ids == "new":
        torch.testing.assert_close(plain[~new_rows], without[~new_rows], rtol=0, atol=0)  # ... and only theirs
    else:
        assert not torch.allclose(plain[~new_rows], without[~new_rows])  # ... and known ids' as well
    scored = predict_queries(model, cfg, batch, [0])[0]
    torch.testing.assert_close(torch.from_numpy(scored), torch.sigmoid(plain[s:]), rtol=1e-6, atol=1e-6)
    out = meta_step(model, batch, cfg)  # ERM on every row, cold term weighted 0
    want = F.binary_cross_entropy_with_logits(plain, batch.labels)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    assert set(out.extra) == {"generator_cold_loss", "generator_new_share"}
    torch.testing.assert_close(out.extra["generator_new_share"], new_rows.float().mean())  # new ids only


@pytest.mark.parametrize("offset_ids", ["new", "all"])
def test_maml_adapts_new_ids_from_their_generated_rows_as_a_per_task_reference(debug_data, offset_ids):
    """The meta step's query losses = the per-task reference on tables whose new ad rows are
    the generated rows (each task adapts its own copy); with offset_ids all, every ad row is
    its own (or the default) row plus the offset."""
    cfg, model, batch, known = _setup(debug_data, extra=("meta.inner_steps=2", "meta.adapt_dense=[over_arch]",
                                                         "generator.cold_weight=0",
                                                         f"generator.offset_ids={offset_ids}"))
    ids = _row_ids(batch)
    w = model.sparse_arch.ec.embeddings["t_ad_id"].weight.detach()
    adv_w = model.sparse_arch.ec.embeddings["t_advertiser_id"].weight.detach()
    ad_table = w[:-1].clone()
    with torch.no_grad():
        for a, v in zip(ids["ad_id"], ids["advertiser_id"]):
            if not known[a[0]]:
                ad_table[a[0]] = w[-1] + model.generator(adv_w[v[0]])
            elif offset_ids == "all":
                ad_table[a[0]] = w[a[0]] + model.generator(adv_w[v[0]])
    tables = {n: e.weight.detach().clone().requires_grad_()
              for n, e in ((k[2:], m) for k, m in model.sparse_arch.ec.embeddings.items())}
    tables["ad_id"] = ad_table.requires_grad_()  # (the reference differentiates with respect to its tables)
    out = meta_step(model, batch, cfg)
    m = cfg.meta
    ref = torch.stack(task_query_losses(model.head, tables, model.features, batch, steps=m.inner_steps,
                                        lr=m.inner_lr, emb_lr=m.embedding_inner_lr, adapt_dense=m.adapt_dense,
                                        adapt_embeddings=True, first_order=m.first_order))
    torch.testing.assert_close(out.query_loss, ref, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.generator.parameters())


def _query_only(batch: TaskBatch) -> TaskBatch:
    """The batch's query rows as tasks with no support rows (new campaigns)."""
    s, r = batch.num_support, batch.num_rows
    per = batch.sparse.to_dict()
    values, lengths = [], []
    for name in batch.sparse.keys():
        jt = per[name]
        off = jt.offsets()
        values.append(jt.values()[off[s]:off[r]])
        lengths.append(jt.lengths()[s:])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=batch.sparse.keys(), values=torch.cat(values),
                                              lengths=torch.cat(lengths))
    return TaskBatch(sparse=kjt, dense=batch.dense[s:], labels=batch.labels[s:],
                     support_offsets=torch.zeros_like(batch.support_offsets), query_offsets=batch.query_offsets,
                     task_ids=batch.task_ids)


def test_a_task_with_no_support_rows_is_scored_zero_shot_from_the_generated_row(debug_data):
    cfg, model, batch, known = _setup(debug_data)
    cold = _query_only(batch)
    assert cold.num_support == 0
    got = predict_query(model, cfg, cold, steps_for_batch(cold, cfg.meta.inner_steps))  # as serving scores it
    ids = _row_ids(cold)
    emb = model.sparse_arch.ec.embeddings
    names = [f["name"] for f in model.features]
    with torch.no_grad():  # every row's cells by hand; a new ad's: default row + generator(its advertiser's row)
        cells = []
        for r in range(cold.num_rows):
            row = []
            for f in model.features:
                n, t = f["name"], emb[f"t_{f['name']}"].weight
                if n == "ad_id" and not known[ids[n][r][0]]:
                    row.append(t[-1] + model.generator(emb["t_advertiser_id"].weight[ids["advertiser_id"][r][0]]))
                else:
                    v = t[ids[n][r]].sum(0)
                    row.append(v / len(ids[n][r]) if f["pooling"] == "mean" else v)
            cells.append(torch.stack(row))
        want = torch.sigmoid(model.head(cold.dense, torch.stack(cells)))
    assert names.index("ad_id") == 1
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)
    default = predict_query(_zeroed(model), cfg, cold, 0)
    new_rows = torch.tensor([not known[a[0]] for a in ids["ad_id"]])
    assert not torch.allclose(torch.from_numpy(default)[new_rows], want[new_rows])
    # any K asked of a batch without support rows scores it as K = 0 (an inner step on no rows
    # changes nothing; it failed with a zero-size reshape before)
    any_k = predict_query(model, cfg, cold, 2)
    torch.testing.assert_close(torch.from_numpy(any_k), torch.from_numpy(got), rtol=0, atol=0)
