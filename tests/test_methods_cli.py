"""`xmodal methods`: every registered method with trainable / total parameter counts."""

from __future__ import annotations

import argparse
import json

import torch

from xmodal.cli import main
from xmodal.cli import methods as methods_cli
from xmodal.methods import list_methods

# xmodal-test: vision width 64, text width 48, 2 blocks each; CMA defaults r=8, d_s=16
CMA_TINY = (
    4 * (64 * 8 + 8 + 8 * (64 - 16) + (64 - 16))  # vision: 2 blocks x (attn, ffn)
    + 4 * (48 * 8 + 8 + 8 * (48 - 16) + (48 - 16))  # text
    + 4 * (8 * 16 + 16)  # shared slices, one per block and position
)


def test_json_lists_every_registered_method(capsys):
    rc = main(["methods", "--backbone", "xmodal-test", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert rc == (1 if any(r.get("error") for r in rows) else 0)
    assert [r["method"] for r in rows] == [m for m in list_methods() if m != "compose"]  # compose lists methods
    by_name = {r["method"]: r for r in rows}
    assert {"cross_modal_adapter", "uni_adapter", "adaptformer", "adapter_attn"} <= set(by_name)
    cma = by_name["cross_modal_adapter"]
    assert cma["trainable"] == CMA_TINY == 7104
    backbone_total = cma["total"] - cma["trainable"]  # the adapter's tensors are extra
    for r in rows:
        assert {"method", "trainable", "total", "percent", "percent_paper", "paper_count", "preset"} <= set(r)
        if r.get("error"):  # another method's failure is reported in its row, not fatal
            continue
        assert 0 < r["trainable"] <= r["total"]
        assert abs(r["percent"] - 100 * r["trainable"] / r["total"]) < 1e-9
        assert r["percent_paper"] >= r["percent"]  # the papers divide by the backbone alone
        assert r["total"] >= backbone_total


def _run(argv):
    parser = argparse.ArgumentParser(prog="xmodal")
    methods_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_table_is_aligned_and_filtered(capsys):
    rc = _run(["methods", "--backbone", "xmodal-test", "--method", "cross_modal_adapter", "--method", "uni_adapter"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    header = next(line for line in lines if line.startswith("method"))
    rows = lines[lines.index(header) + 2:-1]  # the last line explains the columns
    assert [r.split()[0] for r in rows] == ["cross_modal_adapter", "uni_adapter"]
    assert "7,104" in rows[0] and "7,680" in rows[1]
    right_edge = header.index("trainable") + len("trainable")
    assert rows[0].index("7,104") + len("7,104") == right_edge
    assert rows[1].index("7,680") + len("7,680") == right_edge
    assert len({len(r) for r in rows + [header]}) == 1  # every column right-aligned to the same edge
    assert rows[0].endswith("%")


def test_unknown_method_is_a_user_error(capsys):
    rc = main(["methods", "--backbone", "xmodal-test", "--method", "nope"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope" in err and "cross_modal_adapter" in err


def test_rows_leave_the_backbone_untouched(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a dog"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_backbone.encode_text(tokens), tiny_backbone.encode_image(images)
    state = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    rows = methods_cli.method_rows(tiny_backbone, ["cross_modal_adapter", "adaptformer", "adapter_attn"])
    assert [r["trainable"] for r in rows][0] == CMA_TINY
    assert all(not b.ls_1._forward_hooks and not b.ln_2._forward_pre_hooks
               for m in ("vision", "text") for b in tiny_backbone.blocks(m))
    assert all(torch.equal(v, tiny_backbone.state_dict()[k]) for k, v in state.items())
    assert all(not p.requires_grad for p in tiny_backbone.parameters())
    with torch.no_grad():
        after = tiny_backbone.encode_text(tokens), tiny_backbone.encode_image(images)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
