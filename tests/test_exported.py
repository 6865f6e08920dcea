"""inference.exported: translate programs exported to disk give the traced programs' outputs,
are reused by later translators (other params of the same model included), are not used when
the model, the settings, JAX or the code change, and a damaged or foreign file is replaced
with a warning."""

import os
import shutil

import jax
import pytest
from helpers import TRAINED_CHECKPOINT_EVERY, trained_workdir

from transformer_jax.inference import Translator
from transformer_jax.inference import exported as exported_module
from transformer_jax.inference.exported import SUFFIX, ProgramStore

pytest.importorskip("flatbuffers", reason="jax.export serializes with flatbuffers "
                    "(a dependency: pip install -e .)")

# source lengths (EOS included) 3, -, 2, 10; two at a time: batch shapes [2, 8] and [1, 16]
SENTENCES = ["twenty one", "", "seven", "nine thousand nine hundred and ninety nine"]
BATCH = 2


def translate(translator, sentences=SENTENCES, beam=1):
    return translator.translate(sentences, beam_size=beam, batch_size=BATCH)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def traced(workdir):
    """Outputs of the traced programs (no store): newest checkpoint with beams 1 and 2, and
    the first checkpoint (other params of the same model) with beam 1."""
    newest = Translator.from_workdir(workdir)
    return {(None, 1): translate(newest), (None, 2): translate(newest, beam=2),
            (TRAINED_CHECKPOINT_EVERY, 1): translate(
                Translator.from_workdir(workdir, step=TRAINED_CHECKPOINT_EVERY))}


@pytest.fixture(scope="module")
def populated(workdir, tmp_path_factory):
    """A store holding the beam-1 programs of ``SENTENCES`` (two shapes)."""
    store = ProgramStore(str(tmp_path_factory.mktemp("programs")))
    translate(Translator.from_workdir(workdir, program_store=store))
    return store.directory


def programs(store: ProgramStore) -> list[str]:
    return sorted(p for p in os.listdir(store.directory) if p.endswith(SUFFIX))


def count_exports(monkeypatch) -> list:
    calls = []
    real = jax.export.export

    def spy(fn, **kwargs):
        calls.append(fn)
        return real(fn, **kwargs)

    monkeypatch.setattr(jax.export, "export", spy)
    return calls


def test_exported_programs_match_the_traced_ones_and_are_reused(workdir, traced, tmp_path,
                                                                monkeypatch):
    exports = count_exports(monkeypatch)
    first = Translator.from_workdir(workdir, program_store=ProgramStore(str(tmp_path)))
    for beam in (1, 2):
        assert translate(first, beam=beam) == traced[None, beam]
    written = programs(first.program_store)
    assert len(written) == len(exports) == 4  # 2 shapes x 2 beams
    # a new store and translator (as a new process): every program is read back, none
    # exported; other params of the same model share them (values are arguments)
    for step in (None, TRAINED_CHECKPOINT_EVERY):
        again = Translator.from_workdir(workdir, step=step,
                                        program_store=ProgramStore(str(tmp_path)))
        assert translate(again) == traced[step, 1]
    assert len(exports) == 4 and programs(again.program_store) == written


def test_the_key_changes_with_what_the_program_depends_on(workdir, tmp_path, monkeypatch):
    store = ProgramStore(str(tmp_path))
    params = Translator.from_workdir(workdir).params
    leaves, treedef = jax.tree_util.tree_flatten(params)
    src = jax.numpy.zeros((8, 8), jax.numpy.int32)
    base = store.key({"beam": 4}, treedef, leaves, src)
    assert base == ProgramStore(str(tmp_path)).key({"beam": 4}, treedef, leaves, src)
    wider = [jax.numpy.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype) for x in leaves[:1]]
    changed = [
        store.key({"beam": 2}, treedef, leaves, src),  # search settings
        store.key({"beam": 4}, treedef, wider + leaves[1:], src),  # a param shape (config)
        store.key({"beam": 4}, treedef, leaves, src[:, :4]),  # the batch shape
    ]
    for field, value in (("jax", "0.0.0"), ("source", "0" * 64), ("backend", "tpu")):
        other = ProgramStore(str(tmp_path))
        other._environment = dict(store._environment, **{field: value})
        changed.append(other.key({"beam": 4}, treedef, leaves, src))
    assert len({base, *changed}) == len(changed) + 1


def test_a_new_jax_version_exports_anew(workdir, traced, populated, tmp_path, monkeypatch):
    shutil.copytree(populated, tmp_path, dirs_exist_ok=True)
    real = exported_module._environment
    monkeypatch.setattr(exported_module, "_environment", lambda: dict(real(), jax="99.0"))
    exports = count_exports(monkeypatch)
    newer = ProgramStore(str(tmp_path))
    out = translate(Translator.from_workdir(workdir, program_store=newer))
    assert out == traced[None, 1] and len(exports) == 2
    assert len(programs(newer)) == 4  # the older programs stay, under their own keys


@pytest.mark.parametrize("damage", ["truncated", "checksum", "garbage", "foreign"])
def test_a_damaged_or_foreign_file_is_replaced_with_a_warning(workdir, traced, populated,
                                                              tmp_path, capsys, monkeypatch,
                                                              damage):
    shutil.copytree(populated, tmp_path, dirs_exist_ok=True)
    short, long_ = programs(ProgramStore(str(tmp_path)))  # two shapes, in any order
    path = tmp_path / short
    blob = path.read_bytes()
    head = len(exported_module.MAGIC) + 65
    if damage == "truncated":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "checksum":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "garbage":  # a valid checksum over bytes that are no program
        payload = bytes(range(256)) * 4
        path.write_bytes(exported_module.MAGIC + exported_module.hashlib.sha256(
            payload).hexdigest().encode() + b"\n" + payload)
    else:  # another shape's program under this name
        path.write_bytes((tmp_path / long_).read_bytes())
    assert head < len(blob)
    capsys.readouterr()
    again = Translator.from_workdir(workdir, program_store=ProgramStore(str(tmp_path)))
    assert translate(again) == traced[None, 1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    exports = count_exports(monkeypatch)  # written anew, whole: read back by the next one
    third = Translator.from_workdir(workdir, program_store=ProgramStore(str(tmp_path)))
    assert translate(third) == traced[None, 1] and not exports
    assert "warning" not in capsys.readouterr().err


def test_an_unwritable_store_falls_back_to_tracing(workdir, traced, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ProgramStore(str(blocker / "programs"))
    assert translate(Translator.from_workdir(workdir, program_store=store)) == traced[None, 1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot keep exported programs" in warnings[0]
