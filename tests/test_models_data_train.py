"""The real-text data, the small transformer and the training loop.

moe_lib.data, moe_lib.models and moe_lib.train: shapes, deterministic and disjoint splits, the
character-class table, FFN parameter counts, the history table of train(), and argument checks
that name the argument. Everything runs on tiny sizes (a few seconds). The MoE-vs-dense
experiment built on them is tested in test_bench.py.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from moe_lib import MoE
from moe_lib.data import (
    CHAR_CLASSES,
    PROVENANCE,
    SPLITS,
    char_classes,
    lm_batch,
    load_code_corpus,
    load_package_snippets,
    package_files,
    read_bytes,
    split_bounds,
    stdlib_root,
)
from moe_lib.models import Transformer, TransformerConfig, ffn_parameter_counts
from moe_lib.train import evaluate, train

# --------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("n", [0, 1, 7, 10, 99, 1000])
def test_split_bounds_partition_in_order(n):
    b = split_bounds(n)
    assert list(b) == list(SPLITS)
    assert b["train"][0] == 0 and b["test"][1] == n
    assert b["train"][1] == b["val"][0] and b["val"][1] == b["test"][0]
    assert all(lo <= hi for lo, hi in b.values())
    if n >= 10:
        assert b["train"][1] == int(0.8 * n)


def test_provenance_names_python_and_licence():
    assert "CPython" in PROVENANCE and "License" in PROVENANCE


def test_package_files_leave_out_tests_and_refuse_unknown_package():
    files = package_files("unittest")
    folder = stdlib_root() / "unittest"
    assert files and files == sorted(files) and all(f.suffix == ".py" for f in files)
    on_disk = sorted(folder.rglob("*.py"))
    in_tests = [f for f in on_disk if any("test" in p for p in f.relative_to(folder).parts[:-1])]
    assert files == [f for f in on_disk if f not in in_tests]
    with pytest.raises(ValueError, match="package"):
        package_files("no_such_package_xyz")


@pytest.fixture(scope="module")
def snippets():
    return load_package_snippets(packages=("json", "html"), snippet_len=64)


def test_snippet_shapes_and_labels(snippets):
    assert snippets.classes == ("json", "html") and snippets.snippet_len == 64
    for s in SPLITS:
        x, y = snippets.x[s], snippets.y[s]
        assert x.dtype == torch.int64 and x.ndim == 2 and x.shape[1] == 64
        assert y.shape == (x.shape[0],) and y.dtype == torch.int64
        assert 0 <= int(x.min()) and int(x.max()) < 256
        assert set(y.unique().tolist()) == {0, 1}  # every package in every split
    n = {s: snippets.x[s].shape[0] for s in SPLITS}
    assert n["train"] > 5 * n["val"] and n["train"] > 5 * n["test"]


def test_snippets_are_deterministic(snippets):
    again = load_package_snippets(packages=("json", "html"), snippet_len=64)
    for s in SPLITS:
        assert torch.equal(again.x[s], snippets.x[s]) and torch.equal(again.y[s], snippets.y[s])


def test_snippet_splits_are_disjoint_slices_of_each_file(snippets):
    """Rebuild the splits file by file: train, val and test are consecutive, non-overlapping
    ranges of each file's snippets, so no snippet (position in a file) is in two splits."""
    L = snippets.snippet_len
    rebuilt = {s: [] for s in SPLITS}
    for package in snippets.classes:
        for path in package_files(package):
            raw = read_bytes(path)
            n = len(raw) // L
            if n == 0:
                continue
            chunks = torch.tensor(list(raw[: n * L]), dtype=torch.long).view(n, L)
            bounds = split_bounds(n)
            covered = sum(b - a for a, b in bounds.values())
            assert covered == n
            for s, (a, b) in bounds.items():
                rebuilt[s].append(chunks[a:b])
    for s in SPLITS:
        assert torch.equal(torch.cat(rebuilt[s]), snippets.x[s])


def test_code_corpus_splits_partition_each_file():
    path = package_files("json")[0]
    raw = read_bytes(path)
    corpus = load_code_corpus(packages=("json",), max_bytes=len(raw))
    assert corpus.files == [path]
    parts = [bytes(corpus[s].tolist()) for s in SPLITS]
    assert b"".join(parts) == raw  # disjoint and complete, in order
    assert abs(len(parts[0]) - 0.8 * len(raw)) <= 1
    assert corpus["train"].dtype == torch.uint8


def test_code_corpus_max_bytes_caps_the_total_and_is_deterministic():
    a = load_code_corpus(packages=("json",), max_bytes=5000)
    b = load_code_corpus(packages=("json",), max_bytes=5000)
    assert sum(a[s].numel() for s in SPLITS) == 5000
    for s in SPLITS:
        assert torch.equal(a[s], b[s])
    with pytest.raises(ValueError, match="max_bytes"):
        load_code_corpus(packages=("json",), max_bytes=0)


def test_lm_batch_shapes_shift_and_errors():
    data = torch.arange(100, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    x, y = lm_batch(data, 4, 10, g)
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    x2, _ = lm_batch(data, 4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="seq_len"):
        lm_batch(data, 2, 99, g)


def test_char_classes_table():
    text = "aZ_ 9\t\n'\"([{}])+-*/%=<>!&|^~@.,:;#\\`?$é"
    tokens = torch.tensor(list(text.encode()))
    names = [CHAR_CLASSES[i] for i in char_classes(tokens).tolist()]
    expected = (["letter"] * 3 + ["space", "digit", "space", "newline"] + ["quote"] * 2
                + ["bracket"] * 6 + ["operator"] * 14 + ["punctuation"] * 9 + ["other"] * 2)
    assert names == expected  # é is two UTF-8 bytes, both "other"
    every = char_classes(torch.arange(256).view(16, 16))
    assert every.shape == (16, 16) and every.dtype == torch.int64
    assert 0 <= int(every.min()) and int(every.max()) < len(CHAR_CLASSES)
    assert int((every == CHAR_CLASSES.index("letter")).sum()) == 53
    assert int((every == CHAR_CLASSES.index("digit")).sum()) == 10


# ------------------------------------------------------------------------------------- models

MOE = {"num_experts": 4, "top_k": 2, "expert": "swiglu", "balance_loss": "switch"}


def tiny(**kw) -> TransformerConfig:
    base = dict(seq_len=16, d_model=16, n_layers=2, n_heads=2, d_hidden=8)
    if kw.get("ffn", "moe") == "moe":
        base["moe"] = dict(MOE)
    return TransformerConfig(**{**base, **kw})


def test_lm_and_classifier_shapes():
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (3, 12))
    out = Transformer(tiny())(idx)
    assert out.logits.shape == (3, 12, 256) and len(out.routings) == 2
    assert out.aux_loss.shape == () and out.aux_loss.detach().item() > 0
    assert out.routings[0].num_tokens == 36
    cls = Transformer(tiny(task="classify", num_classes=5))(idx)
    assert cls.logits.shape == (3, 5)
    dense = Transformer(tiny(ffn="dense"))(idx)
    assert dense.routings == [] and float(dense.aux_loss) == 0.0


def test_lm_is_causal_and_classifier_is_not():
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (1, 10))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 256
    lm = Transformer(tiny(ffn="dense")).eval()
    torch.testing.assert_close(lm(idx).logits[:, :-1], lm(changed).logits[:, :-1])
    cls = Transformer(tiny(ffn="dense", task="classify", num_classes=3)).eval()
    assert not torch.allclose(cls(idx).logits, cls(changed).logits)


def test_ffn_parameter_counts():
    d, h, E, k, L = 16, 8, 4, 2, 2
    moe_model = Transformer(tiny())
    counts = ffn_parameter_counts(moe_model)
    router = d * E
    expert = 3 * d * h  # SwiGLU: gate, up and down projections, no biases
    assert counts == {"total": L * (router + E * expert), "active": L * (router + k * expert)}
    assert counts["total"] == sum(p.numel() for b in moe_model.blocks for p in b.ffn.parameters())
    assert all(isinstance(b.ffn, MoE) for b in moe_model.blocks)

    dense = Transformer(tiny(ffn="dense", d_hidden=k * h))
    dcounts = ffn_parameter_counts(dense)
    params = sum(p.numel() for b in dense.blocks for p in b.ffn.parameters())
    assert dcounts == {"total": params, "active": params}
    assert dcounts["total"] == counts["active"] - L * router  # same active parameters, no router


@pytest.mark.parametrize(
    "kwargs, name",
    [({"d_model": 0}, "d_model"), ({"n_layers": 1.5}, "n_layers"), ({"ffn": "mlp"}, "ffn"),
     ({"task": "seq2seq"}, "task"), ({"d_model": 15, "n_heads": 2}, "n_heads"),
     ({"task": "classify", "num_classes": 0}, "num_classes"), ({"dropout": 1.0}, "dropout"),
     ({"seq_len": -3}, "seq_len")],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        tiny(**kwargs)


def test_forward_errors_name_the_problem():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))


# -------------------------------------------------------------------------------------- train


def _copy_task(B: int = 8, S: int = 16):
    """Predict the byte itself (y = x): learnable in a few steps."""
    g = torch.Generator().manual_seed(0)

    def next_batch(step: int):
        x = torch.randint(0, 32, (B, S), generator=g)
        return x, x

    return next_batch


def test_train_history_shares_and_loss_goes_down():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layers=2))
    val_x = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(1))
    before = evaluate(model, [(val_x, val_x)], "cpu")
    res = train(model, _copy_task(), steps=30, lr=1e-2, eval_batches=[(val_x, val_x)],
                eval_every=10, progress=False)
    h = res.history
    assert isinstance(h, pd.DataFrame) and len(h) == 30
    assert {"step", "loss", "aux_loss", "val_loss"} <= set(h.columns)
    assert h["step"].tolist() == list(range(30))
    assert h.dropna(subset=["val_loss"])["step"].tolist() == [0, 10, 20, 29]
    assert res.expert_share.shape == (30, 2, 4)
    torch.testing.assert_close(res.expert_share.sum(-1), torch.ones(30, 2))
    assert res.dropped.shape == (30, 2) and float(res.dropped.max()) == 0.0  # dropless
    assert res.seconds > 0 and not model.training
    after = h["val_loss"].dropna().iloc[-1]
    assert after < 0.7 * before, (before, after)
    assert h["loss"].iloc[-5:].mean() < 0.7 * h["loss"].iloc[:5].mean()


def test_train_records_dropped_share_and_dense_has_no_shares():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layers=1, moe={**MOE, "capacity_factor": 0.5}))
    res = train(model, _copy_task(), steps=3, progress=False)
    assert res.dropped.shape == (3, 1) and float(res.dropped.min()) >= 0.5 - 1e-6
    assert "val_loss" not in res.history.columns
    dense = train(Transformer(tiny(ffn="dense")), _copy_task(), steps=2, progress=False)
    assert dense.expert_share.numel() == 0 and dense.dropped.numel() == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"lr": 0.0}, "lr"),
     ({"eval_every": 0}, "eval_every"), ({"weight_decay": -1.0}, "weight_decay")],
)
def test_train_errors_name_the_argument(kwargs, name):
    args = {"steps": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        train(Transformer(tiny()), _copy_task(), progress=False, **args)



# ----------------------------------------------------------- micro-batches, loss-free bias


def _fixed_batches(n: int, B: int = 4, S: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (B, S), generator=g) for _ in range(n)]


def test_micro_batches_accumulate_to_the_big_batch_gradient():
    """A dense model: two micro-batches of 4 give the step of one batch of 8."""
    xs = _fixed_batches(2)
    big = torch.cat(xs)
    results = []
    for m, batches in ((1, [big]), (2, xs)):
        torch.manual_seed(0)
        model = Transformer(tiny(ffn="dense"))
        train(model, lambda i, b=batches: (b[i], b[i]), steps=1, micro_batches=m,
              progress=False)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bias_update_after_each_step_pools_micro_batches_and_can_freeze():
    moe = {"num_experts": 4, "top_k": 2, "score": "sigmoid", "selection_bias": True}
    torch.manual_seed(0)
    model = Transformer(tiny(moe=moe))
    xs = _fixed_batches(8)
    res = train(model, lambda i: (xs[i], xs[i]), steps=4, micro_batches=2, progress=False,
                bias_update=lambda step: 1e-2 if step < 2 else 0.0)
    biases = [m.router.selection_bias for m in model.moe_layers()]
    for b in biases:
        assert b.abs().max() <= 2 * 1e-2 + 1e-9  # two updates of at most gamma, then frozen
        assert b.abs().max() > 0
    assert res.max_violation.shape == (4, 2) and (res.max_violation >= 0).all()
    assert res.expert_share.shape == (4, 2, 4)
    with pytest.raises(ValueError, match="selection_bias=True"):
        train(Transformer(tiny()), _copy_task(), steps=1, bias_update=1e-3, progress=False)


def test_global_balance_loss_pools_counts_over_micro_batches():
    """With equal micro-batches the global-batch loss equals the Switch loss of the whole
    step's tokens (f pooled, P averaged)."""
    from moe_lib import losses
    from moe_lib.routing import concat_routings

    moe = {"num_experts": 4, "top_k": 2}
    torch.manual_seed(0)
    model = Transformer(tiny(moe=moe))
    xs = _fixed_batches(2)
    snapshot = [p.detach().clone() for p in model.parameters()]
    res = train(model, lambda i: (xs[i], xs[i]), steps=1, micro_batches=2, lr=1e-9,
                global_balance_coef=1.0, progress=False)
    with torch.no_grad():
        for p, q in zip(model.parameters(), snapshot, strict=True):
            p.copy_(q)
        model.train()
        outs = [model(x) for x in xs]
    want = sum(losses.switch_loss(concat_routings([o.routings[layer] for o in outs]))
               for layer in range(2))
    assert res.history["aux_loss"][0] == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="balance_loss=None"):
        train(Transformer(tiny()), _copy_task(), steps=1, global_balance_coef=1e-2,
              progress=False)
