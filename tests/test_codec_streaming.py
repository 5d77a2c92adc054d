"""Streaming Mimi decoding (codec_chroma.MimiStreamingDecoder) equals one-shot `MimiModel.decode`.

transformers' Mimi decoder keeps no convolution state between calls, so decoding chunk by chunk with it is not decoding
everything at once; the streaming decoder carries conv contexts, transposed-conv overlaps and the transformer's
sliding-window KV cache. A failure here means streamed audio has clicks or drift at chunk boundaries.

Tolerance: max |streamed - one-shot| <= TOLERANCE * max |one-shot|, TOLERANCE = 1e-5. Both sides run the same float32
products; only their summation order differs (overlap-add split across calls and bias added after the overlap sum,
attention rows over a cache slice instead of a masked full row, conv kernels chosen per input length), so the
difference is rounding only: float32 epsilon is 1.2e-7, amplified through ~20 layers; the measured worst case is
1.5e-6 of the absmax (random and checkpoint weights, transformers 5.0 and 5.23). 1e-5 leaves ~7x headroom for other
BLAS/oneDNN builds and stays >1000x below the state bugs it must catch, measured as fractions of the absmax: HF's
own frame-by-frame decode 0.98, transposed-conv overlaps dropped 0.73, conv contexts dropped 0.83, RoPE positions
restarting every chunk 0.12, sliding window off by one 0.14 (the last two with `random_mimi`'s transformer gains).
"""

import logging

import pytest
import torch
from transformers import MimiConfig, MimiModel

from conftest import reference
from openchroma.codec_chroma import MimiStreamingDecoder, mimi_decoder_parts
from openchroma.configuration_chroma import ChromaConfig


logger = logging.getLogger(__name__)

TOLERANCE = 1e-5  # relative to the one-shot signal's absmax; see the module docstring

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: extra intra-op threads only add synchronisation (5x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SCHEDULES = {
    "one_frame_at_a_time": [1] * 64,
    "2_4_8": [2, 4, 8] * 8,
    "one_chunk": [64],
    "odd_sizes": [3, 5, 1, 7] * 8,
}


def random_mimi(seed=0, **config_overrides) -> MimiModel:
    """The tiny Chroma Mimi with seeded random weights; codebooks, biases and layer scales randomised too (they are
    zeros/ones/0.01 after init), so that no path is trivially zero. Transformer projections get unit gain (q/k twice
    that) instead of N(0, 0.02): with the init's near-uniform attention, wrong RoPE positions or a wrong window would
    change the audio by less than the tolerance."""
    config = ChromaConfig.tiny().codec_config.to_dict()
    config.update(config_overrides)
    torch.manual_seed(seed)
    codec = MimiModel(MimiConfig(**config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in codec.named_parameters():
            if name.endswith("scale"):
                param.copy_(torch.rand(param.shape, generator=g) * 0.8 + 0.2)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
            elif "transformer" in name and param.dim() == 2:  # [out, in] Linear weights
                gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                param.copy_(torch.randn(param.shape, generator=g) * gain / param.shape[1] ** 0.5)
        for name, buffer in codec.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=g))
            elif name.endswith("cluster_usage"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    return codec


def random_codes(batch, frames, seed=0, codebooks=8, codebook_size=2048):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, codebook_size, (batch, codebooks, frames), generator=g)


def stream(decoder, codes, schedule):
    """Decode codes [B, K, T] chunk by chunk (sizes from `schedule`, cut at T) -> pcm [B, T * frame_samples]."""
    state = decoder.init_state(codes.shape[0])
    pieces, start = [], 0
    for size in schedule:
        if start >= codes.shape[-1]:
            break
        chunk = codes[..., start : start + size]
        pcm = decoder.decode_chunk(chunk, state)
        assert pcm.shape == (codes.shape[0], chunk.shape[-1] * decoder.frame_samples)
        pieces.append(pcm)
        start += size
    assert start >= codes.shape[-1], "schedule shorter than the codes"
    return torch.cat(pieces, dim=-1)


@torch.no_grad()
def one_shot(codec, codes):
    return codec.decode(codes).audio_values[:, 0]  # [B, T * frame_samples]


def relative_error(streamed, expected, label=""):
    error = (streamed - expected).abs().max().item()
    scale = expected.abs().max().item()
    logger.info("%s: max|diff| %.3g, absmax %.3g, relative %.3g", label, error, scale, error / scale)
    return error / scale


@torch.no_grad()
def explicit_mask_one_shot(codec, codes, sliding_window):
    """One-shot decode through transformers' own modules with an explicit attention mask: position p attends to
    p - sliding_window + 1 .. p (None: the whole past). Independent of how the installed transformers builds masks."""
    upsample, transformer, seanet = mimi_decoder_parts(codec)
    hidden = upsample(codec.quantizer.decode(codes)).transpose(1, 2)  # [B, T, D]
    steps = torch.arange(hidden.shape[1])
    allowed = steps[None, :] <= steps[:, None]
    if sliding_window is not None:
        allowed &= steps[None, :] > steps[:, None] - sliding_window
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]  # [1, 1, T, T]
    hidden = transformer(hidden, attention_mask=mask).last_hidden_state
    return seanet(hidden.transpose(1, 2))[:, 0]


# -- chunk schedules ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_random_tiny_mimi_streams_like_one_shot(schedule):
    codec = random_mimi()
    codes = random_codes(batch=2, frames=23)
    expected = one_shot(codec, codes)
    streamed = stream(MimiStreamingDecoder(codec), codes, schedule)
    assert relative_error(streamed, expected, "random tiny") <= TOLERANCE


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_checkpoint_mimi_streams_like_one_shot(schedule):
    """The golden fixture's Mimi decoding the fixture's generated codes (row 0) and the same codes reversed in time
    (row 1)."""
    codec = reference("reference_tiny").model().codec_model
    codes = torch.from_numpy(reference("reference_tiny").expected["gen_codes"]).T[None]  # [T, K] -> [1, K, T]
    codes = torch.cat([codes, codes.flip(-1)])  # [2, K, T]
    expected = one_shot(codec, codes)
    streamed = stream(MimiStreamingDecoder(codec), codes, schedule)
    assert relative_error(streamed, expected, "checkpoint") <= TOLERANCE


# -- the decoder transformer's sliding window --------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [[1] * 64, [3, 5, 1, 7] * 8], ids=["one_frame_at_a_time", "odd_sizes"])
def test_sliding_window_matches_windowed_one_shot(schedule):
    """sliding_window=8 steps (4 frames) and 24 frames: the cache wraps many times; positions keep counting."""
    codec = random_mimi(sliding_window=8)
    codes = random_codes(batch=2, frames=24, seed=1)
    expected = explicit_mask_one_shot(codec, codes, sliding_window=8)
    streamed = stream(MimiStreamingDecoder(codec), codes, schedule)
    assert relative_error(streamed, expected, "sliding window 8") <= TOLERANCE
    # the window matters here, so the comparison is not vacuous
    assert relative_error(explicit_mask_one_shot(codec, codes, sliding_window=None), expected) > 10 * TOLERANCE


def test_no_window_matches_full_attention():
    codec = random_mimi(sliding_window=8)
    codes = random_codes(batch=2, frames=24, seed=2)
    expected = explicit_mask_one_shot(codec, codes, sliding_window=None)
    streamed = stream(MimiStreamingDecoder(codec, sliding_window=None), codes, [2, 4, 8] * 4)
    assert relative_error(streamed, expected, "no window") <= TOLERANCE


def test_installed_one_shot_decode_is_reproduced_beyond_the_window():
    """`MimiModel.decode` applies config.sliding_window on transformers > 5.0 (checked: 5.23) and ignores it on 5.0.0;
    the default (window from the config) or `sliding_window=None` reproduces whichever the installed version does."""
    codec = random_mimi(sliding_window=8)
    codes = random_codes(batch=2, frames=24, seed=3)
    expected = one_shot(codec, codes)
    windowed = relative_error(stream(MimiStreamingDecoder(codec), codes, [5] * 5), expected, "window 8 vs decode")
    full = relative_error(stream(MimiStreamingDecoder(codec, sliding_window=None), codes, [5] * 5), expected, "full")
    assert min(windowed, full) <= TOLERANCE
    assert max(windowed, full) > 10 * TOLERANCE


# -- per-row state -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_mode", ["constant", "replicate"])
def test_reset_restarts_only_the_chosen_rows(pad_mode):
    """Row 0 decodes A[0:16] straight through; row 1 decodes B[0:6], is reset, then decodes C[0:10]. Each row must
    equal its own one-shot decode (sliding window 8 steps, so the rows' positions and windows differ after the reset).
    "replicate" padding pads a new stream with its first sample, so the reset must restore that too."""
    codec = random_mimi(sliding_window=8, pad_mode=pad_mode)
    a, b, c = random_codes(1, 16, seed=4), random_codes(1, 6, seed=5), random_codes(1, 10, seed=6)
    decoder = MimiStreamingDecoder(codec)
    state = decoder.init_state(2)
    first = decoder.decode_chunk(torch.cat([a[..., :6], b]), state)  # [2, 6 * frame_samples]
    decoder.reset(state, torch.tensor([False, True]))
    rest = []
    for start in range(0, 10, 2):  # A[6:16] next to C[0:10]
        chunk = torch.cat([a[..., 6 + start : 8 + start], c[..., start : start + 2]])  # [2, K, 2]
        rest.append(decoder.decode_chunk(chunk, state))
    rest = torch.cat(rest, dim=-1)
    expected = {name: explicit_mask_one_shot(codec, x, sliding_window=8)[0] for name, x in zip("abc", (a, b, c))}
    assert relative_error(torch.cat([first[0], rest[0]]), expected["a"], "row kept") <= TOLERANCE
    assert relative_error(first[1], expected["b"], "row before reset") <= TOLERANCE
    assert relative_error(rest[1], expected["c"], "row after reset") <= TOLERANCE


def test_uses_the_codec_weights_not_a_copy():
    codec = random_mimi()
    decoder = MimiStreamingDecoder(codec)
    _, _, seanet = mimi_decoder_parts(codec)
    with torch.no_grad():
        seanet.layers[-1].conv.weight.mul_(-2.0)  # changed after the decoder was built
    codes = random_codes(batch=1, frames=5, seed=7)
    assert relative_error(stream(decoder, codes, [2, 3]), one_shot(codec, codes)) <= TOLERANCE


def test_frame_samples_and_empty_chunk():
    codec = reference("reference_tiny").model().codec_model
    decoder = MimiStreamingDecoder(codec)
    assert decoder.frame_samples == 1920  # 24 kHz / 12.5 Hz
    state = decoder.init_state(3)
    assert decoder.decode_chunk(torch.zeros(3, 8, 0, dtype=torch.long), state).shape == (3, 0)
    assert int(state.next_position.max()) == 0


@pytest.mark.parametrize(
    "overrides, message",
    [({"trim_right_ratio": 0.5}, "trim_right_ratio"), ({"use_causal_conv": False}, "causal")],
)
def test_unstreamable_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        MimiStreamingDecoder(random_mimi(**overrides))


@pytest.mark.parametrize("sliding_window", [8, None])
def test_streams_joining_and_leaving_a_batch_decode_as_alone(sliding_window):
    """Decoder states concatenated (a stream joins a running batch) and selected (streams leave) keep every stream's
    audio what it is alone, with the window's fixed cache and with caches of different lengths (no window)."""
    codec = random_mimi(sliding_window=8)
    decoder = MimiStreamingDecoder(codec, sliding_window=sliding_window)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, codec.config.codebook_size, (3, codec.config.num_quantizers, 12), generator=g)
    alone = [stream(decoder, codes[b:b + 1], [3, 4, 5])[0] for b in range(3)]
    first = decoder.init_state(1)
    pieces = [[decoder.decode_chunk(codes[0:1, :, :3], first)[0]], [], []]
    pieces[0].append(decoder.decode_chunk(codes[0:1, :, 3:7], first)[0])  # stream 0 is 7 frames ahead
    late = decoder.init_state(2)
    out = decoder.decode_chunk(codes[1:3, :, :2], late)
    pieces[1].append(out[0])
    pieces[2].append(out[1])
    together = decoder.concat_states([first, late])
    out = decoder.decode_chunk(torch.cat([codes[0:1, :, 7:10], codes[1:3, :, 2:5]]), together)
    for b in range(3):
        pieces[b].append(out[b])
    rest = decoder.select_state(together, [2, 0])  # stream 1 leaves; the others go on in a new order
    out = decoder.decode_chunk(torch.cat([codes[2:3, :, 5:7], codes[0:1, :, 10:12]]), rest)
    pieces[2].append(out[0])
    pieces[0].append(out[1])
    frame = decoder.frame_samples
    for b, length in ((0, 12), (1, 5), (2, 7)):
        streamed = torch.cat(pieces[b])
        assert streamed.shape[-1] == length * frame
        assert relative_error(streamed, alone[b][..., : length * frame]) <= TOLERANCE
