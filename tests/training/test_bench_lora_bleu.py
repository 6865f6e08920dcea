"""bench/lora_finetune.py --bleu --smoke: the BLEU protocol (base on domain A, LoRA and full
fine-tuning on domain B from it through init_from, BLEU on both domains) runs end to end."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bleu_smoke_run_writes_every_number(tmp_path):
    out = tmp_path / "bleu.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "lora_finetune.py"), "--bleu", "--smoke",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    sizes = result["sizes"]
    assert sizes["a_train"] > 0 and sizes["b_train"] > 0 and sizes["b_test"] > 0
    base, lora, full = result["rows"]
    assert base["updates"] == 6 and lora["updates"] == full["updates"] == 3
    assert lora["mode"].startswith("LoRA") and full["mode"] == "full fine-tuning"
    assert full["trainable"] == full["params"] == lora["params"] - lora["trainable"]
    assert 0 < lora["trainable"] < full["trainable"]
    assert 0 < lora["opt_state_mib"] < full["opt_state_mib"]
    for row in (base, lora, full):
        assert 0 <= row["bleu_a"] <= 100 and 0 <= row["bleu_b"] <= 100
    assert "load_avg_1m" in result["machine_start"] and len(result["load_avg_end"]) == 3
    assert "| full fine-tuning |" in done.stdout


def test_domain_b_is_every_caption_naming_an_animal_as_a_whole_word():
    spec = importlib.util.spec_from_file_location(
        "lora_bleu", os.path.join(ROOT, "bench", "lora_bleu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.in_domain_b("Two DOGS play in the snow.")
    assert bench.in_domain_b("A man rides a horse.")
    assert not bench.in_domain_b("A man eats a hotdog near the catwalk.")
