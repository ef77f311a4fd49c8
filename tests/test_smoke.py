import torch

from xmodal.backbones.context import num_frames
from xmodal.cli import build_parser


def test_video_context_reaches_blocks(tiny_backbone):
    seen = []
    blk = tiny_backbone.blocks("vision")[0]
    h = blk.ls_1.register_forward_hook(lambda m, a, o: seen.append((num_frames(), o.shape[0])))
    tiny_backbone.encode_video(torch.randn(2, 3, 3, 32, 32))
    tiny_backbone.encode_image(torch.randn(4, 3, 32, 32))
    h.remove()
    assert seen == [(3, 6), (1, 4)]


def test_max_words_keeps_end_token(tiny_backbone):
    toks = tiny_backbone.tokenize(["one two three four five six seven eight nine ten", "hi"], max_words=6)
    eot = tiny_backbone.tokenizer.eot_token_id
    assert toks[0, 5].item() == eot and (toks[0, 6:] == 0).all()
    assert toks[0].argmax().item() == 5
    assert toks[1, 2].item() == eot


def test_cli_parser_builds():
    assert build_parser().prog == "xmodal"
