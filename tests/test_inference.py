"""transformer_jax.inference: scores against sacrebleu, translation against a naive greedy
decoder written with full forward passes, bucketing invariance, attention maps, loading."""

import functools
import shutil

import jax
import numpy as np
import pytest
import sacrebleu
from flax import nnx
from helpers import TRAINED_CHECKPOINT_EVERY, TRAINED_STEPS, trained_workdir

from transformer_jax.checkpoints import load_params
from transformer_jax.data.tokenizer import EOS_ID
from transformer_jax.inference import (
    Translator,
    attention_maps,
    bleu,
    chrf,
    corpus_scores,
    load,
)

# Source lengths (EOS included) 3, -, 2, 10, 7, -: two length buckets (8 and 16).
SENTENCES = ["twenty one", "", "seven", "nine thousand nine hundred and ninety nine",
             "one hundred and five", "   "]
SHORT = ["twenty one", "", "seven", "eighty", "three"]  # one length bucket


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="session")
def translator(workdir):
    return Translator.from_workdir(workdir)


# ------------------------------------------------------------------------------ scores
HYPS = ["the cat sat on the mat today", "ein Haus am See", "", "Zwei Hunde spielen im Park ."]
REFS = ["the cat sat on a mat today", "ein Haus am See", "x", "Zwei Hunde spielen im Garten ."]


def test_corpus_scores_match_sacrebleu_objects():
    got = corpus_scores(HYPS, REFS, ("bleu", "chrf", "exact_match"))
    assert got["bleu"] == pytest.approx(sacrebleu.metrics.BLEU().corpus_score(HYPS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.metrics.CHRF().corpus_score(HYPS, [REFS]).score)
    assert got["exact_match"] == pytest.approx(25.0)
    assert 0.0 < got["bleu"] < 100.0 and 0.0 < got["chrf"] < 100.0
    assert set(corpus_scores(HYPS, REFS, ("chrf",))) == {"chrf"}
    assert corpus_scores([], [], ("bleu",)) == {}


def test_bleu_chrf_options_match_sacrebleu():
    hyps, refs = ["The Cat sat on the mat ."], ["the cat sat on the mat ."]
    assert bleu(hyps, refs, lowercase=True) == pytest.approx(100.0)
    assert bleu(hyps, refs) == pytest.approx(
        sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score)
    assert bleu(hyps, refs) < 100.0
    assert chrf(hyps, refs, word_order=2) == pytest.approx(
        sacrebleu.metrics.CHRF(word_order=2).corpus_score(hyps, [refs]).score)


def test_scores_reject_unaligned_lists():
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        corpus_scores(["a", "b", "c"], ["a", "b"], ("bleu",))


# ------------------------------------------------------------------------------ decoding
@functools.cache
def _forward(graphdef):
    return jax.jit(lambda params, src, targets: nnx.merge(graphdef, params)(
        {"inputs": src, "targets": targets}))


def naive_greedy(translator, src_ids, cap):
    """Greedy decoding by re-running the whole decoder on the prefix at every step."""
    forward = _forward(translator.model_def.graphdef)
    buffer = translator.max_decode_length
    src = np.zeros((1, 16), np.int32)  # [1, S] padded to a fixed width
    src[0, : len(src_ids)] = src_ids
    targets = np.zeros((1, buffer), np.int32)  # the prefix; later columns ignored (causal)
    out = []
    for t in range(min(cap, buffer)):
        logits = np.asarray(forward(translator.params, src, targets))[0, t]  # [V]
        token = EOS_ID if t == min(cap, buffer) - 1 else int(np.argmax(logits))
        out.append(token)
        if token == EOS_ID:
            break
        targets[0, t] = token
    return out


def test_greedy_equals_naive_full_forward_decoding(translator):
    ids, _ = translator.encode(SENTENCES)
    got = translator.translate(SENTENCES, beam_size=1, batch_size=2)
    for text, row, out in zip(SENTENCES, ids, got, strict=True):
        if row is None:
            assert out == ""
            continue
        want = naive_greedy(translator, row, len(row) + translator.extra_length)
        assert out == translator.tokenizer.decode([want])[0], text


def test_output_length_cap_is_source_length_plus_extra(translator):
    short = Translator(translator.model_def.merge(translator.params), translator.tokenizer,
                       extra_length=2)
    rows = [r for r in short.encode(SHORT)[0] if r is not None]
    out = short.translate_ids(rows, beam_size=1, batch_size=4)
    for row, got in zip(rows, out, strict=True):
        want = naive_greedy(short, row, len(row) + 2)
        assert len(want) <= len(row) + 2
        assert got[: len(want)].tolist() == want
        assert not got[len(want):].any()


@pytest.mark.parametrize("beam_size, sentences", [(1, SENTENCES), (2, SHORT)])
def test_batched_by_length_equals_one_by_one(translator, beam_size, sentences):
    batched = translator.translate(sentences, beam_size=beam_size, batch_size=2)
    single = [translator.translate([s], beam_size=beam_size)[0] for s in sentences]
    assert batched == single
    assert len(batched) == len(sentences)
    assert [bool(b) for b in batched] == [bool(s.strip()) for s in sentences]


def test_blank_inputs_need_no_model(translator):
    assert translator.translate([]) == []
    assert translator.translate(["", " \t"]) == ["", ""]
    with pytest.raises(TypeError, match="wrap a single one"):
        translator.translate("seven")
    with pytest.raises(ValueError, match="1 to 32 ids per row"):
        translator.translate_ids([[5] * 33])


def test_overlong_lines_are_cut_with_one_warning(translator, capsys):
    limit = 6
    short = Translator(translator.model_def.merge(translator.params), translator.tokenizer,
                       max_source_length=limit)
    lines = ["nine thousand nine hundred and ninety nine", "seven", "four thousand and twelve",
             "one hundred thousand"]
    lengths = [len(translator.tokenizer.encode_one(s)) + 1 for s in lines]
    long = [i for i, n in enumerate(lengths) if n > limit]
    assert len(long) >= 2 and lengths[1] <= limit
    ids, cut = short.encode(lines)
    assert cut == long
    for i in long:
        assert ids[i] == translator.tokenizer.encode_one(lines[i])[: limit - 1] + [EOS_ID]
    capsys.readouterr()
    out = short.translate(lines, beam_size=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{len(long)} input line(s) longer than {limit}" in err[0]
    assert f"line {long[0] + 1}" in err[0]
    for i in long:  # the cut ids are what gets translated
        want = naive_greedy(short, ids[i], len(ids[i]) + short.extra_length)
        assert out[i] == short.tokenizer.decode([want])[0]


# ------------------------------------------------------------------------------ attention
def test_attention_maps_shapes_rows_and_unpadded_reference(translator):
    source, target = "four thousand and twelve", "viertausendzwölf"
    maps = attention_maps(translator, source, target)
    tok = translator.tokenizer
    src = tok.encode_one("four thousand twelve") + [EOS_ID]  # the numbers run drops "and"
    tgt = tok.encode_one(target) + [EOS_ID]
    cfg = translator.config
    assert maps["cross"].shape == (cfg.num_layers, cfg.num_heads, len(tgt), len(src))
    assert maps["encoder_self"].shape == (cfg.num_layers, cfg.num_heads, len(src), len(src))
    assert maps["decoder_self"].shape == (cfg.num_layers, cfg.num_heads, len(tgt), len(tgt))
    np.testing.assert_allclose(maps["cross"].sum(-1), 1.0, atol=1e-5)
    assert maps["source_tokens"] == [tok.id_to_piece(i) for i in src]
    assert maps["source_tokens"][-1] == maps["target_tokens"][-1] == "</s>"
    assert maps["target_ids"] == tgt and maps["target"] == target
    # Same weights from one unpadded forward pass of the model itself.
    forward = jax.jit(lambda p, b: nnx.merge(translator.model_def.graphdef, p).with_attention(
        b)[1])
    weights = forward(translator.params, {"inputs": np.asarray([src]),
                                          "targets": np.asarray([tgt])})
    np.testing.assert_allclose(maps["cross"], np.asarray(weights["decoder_cross"])[:, 0],
                               atol=1e-5)
    np.testing.assert_allclose(maps["decoder_self"], np.asarray(weights["decoder_self"])[:, 0],
                               atol=1e-5)


def test_attention_maps_translates_when_no_target_and_wraps_a_model(translator):
    maps = attention_maps(translator, "twenty-one")  # the training spelling: no normaliser
    assert maps["target"] == translator.translate(["twenty-one"], beam_size=1)[0]
    model = translator.model  # a model in memory goes through a Translator too
    other = attention_maps(Translator(model, translator.tokenizer), "twenty-one", maps["target"])
    np.testing.assert_allclose(other["cross"], maps["cross"], atol=1e-6)
    assert other["target_tokens"] == maps["target_tokens"]
    with pytest.raises(TypeError, match="Translator"):
        attention_maps(model, "twenty one")


def test_load_is_one_call_to_a_ready_translator(workdir, translator):
    loaded = load(workdir)
    assert isinstance(loaded, Translator) and loaded.step == translator.step
    assert loaded.translate(SHORT, beam_size=1) == translator.translate(SHORT, beam_size=1)
    logits = loaded.model({"inputs": np.asarray([[5, 6, EOS_ID]]),
                           "targets": np.asarray([[7, EOS_ID]])})  # [1, 2, V]
    assert logits.shape == (1, 2, loaded.config.vocab_size)
    with pytest.raises(FileNotFoundError, match="no work directory"):
        load(f"{workdir}_missing")


def test_attention_maps_rows_are_the_generated_ids(translator, monkeypatch):
    source = "nine hundred ninety-nine thousand eighty-one"
    (src,), _ = translator.encode([source])
    generated = translator.translate_ids([src], beam_size=1)[0].tolist()
    generated = generated[: generated.index(EOS_ID) + 1]
    # Re-encoding the decoded text need not give the generated pieces back; make sure the
    # maps never try.
    monkeypatch.setattr(translator.tokenizer, "encode_one", lambda text: pytest.fail(text))
    maps = translator.attention(source)
    assert maps["target_ids"] == generated
    assert maps["cross"].shape[2] == len(generated)
    assert maps["target"] == translator.tokenizer.decode([generated])[0]


# ------------------------------------------------------------------------------ loading
def test_from_workdir_step_and_averaged_params(workdir, translator):
    assert translator.step == TRAINED_STEPS
    early = Translator.from_workdir(workdir, step=TRAINED_CHECKPOINT_EVERY)
    assert early.step == TRAINED_CHECKPOINT_EVERY
    averaged = Translator.from_workdir(workdir, averaged=True)
    a, b = load_params(workdir, TRAINED_CHECKPOINT_EVERY), load_params(workdir, TRAINED_STEPS)
    leaves = zip(jax.tree_util.tree_leaves(averaged.params), jax.tree_util.tree_leaves(a),
                 jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(translator.params),
                 strict=True)
    for avg, x, y, last in leaves:
        np.testing.assert_allclose(np.asarray(avg), (np.asarray(x) + np.asarray(y)) / 2,
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(last), np.asarray(y))
    assert any(not np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(early.params), jax.tree_util.tree_leaves(translator.params),
        strict=True))


def test_from_workdir_errors(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no work directory"):
        Translator.from_workdir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="step 3 "):
        Translator.from_workdir(workdir, step=3)
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy,
                    ignore=shutil.ignore_patterns("data", "tensorboard", "averaged"))
    with pytest.raises(FileNotFoundError, match="no averaged checkpoint .*training.average"):
        Translator.from_workdir(str(copy), averaged=True)
    with open(copy / "tokenizer" / "spm.model", "ab") as f:
        f.write(b"changed")
    with pytest.raises(ValueError, match="not the one this checkpoint was trained with"):
        Translator.from_workdir(str(copy))


def test_translator_from_model_in_memory(translator):
    model = nnx.eval_shape(lambda: translator.model_def.merge(translator.params))
    with pytest.raises(ValueError, match="pass params="):
        Translator(model, translator.tokenizer)
    same = Translator(model, translator.tokenizer, params=translator.params)
    assert same.translate(["seven", "eighty"], beam_size=1) == translator.translate(
        ["seven", "eighty"], beam_size=1)
