"""The lm-evaluation-harness wrapper (``--model spacache``) on the shipped tiny checkpoint.

A local task YAML + JSONL data file (no downloads): 4-digit addition from the tiny checkpoint's
held-out stream, scored by lm-eval's own exact_match. Skipped when lm_eval is not installed
(``pip install -e '.[lm_eval]'``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from spacache_kernels.integrations.tiny_tasks import heldout_problems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "tiny-dlm"
N = 8
MODEL_ARGS = f"pretrained={CHECKPOINT},policy=spa,gen_length=8,steps=8,block_length=8,backend=torch"


def _write_task(directory: Path) -> None:
    problems = heldout_problems("add", N)
    data = directory / "tiny_add.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    (directory / "tiny_add.yaml").write_text(
        "task: tiny_add\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "target_delimiter: ''\n"
        "generation_kwargs:\n  until: ['=']\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls on a shared 2-core CPU: one thread is much faster
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_task(directory)
    return directory


def _offline_env() -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    return env


def test_simple_evaluate_in_process(task_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import spacache_kernels.integrations.lm_eval_model as wrapper

    for key, value in _offline_env().items():
        monkeypatch.setenv(key, value)
    results = lm_eval.simple_evaluate(
        model=wrapper.MODEL_NAME,
        model_args=MODEL_ARGS + ",max_update_ratio=0.5",
        tasks=["tiny_add"],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=4,
        log_samples=True,
    )
    score = results["results"]["tiny_add"]["exact_match,none"]
    assert score >= 0.75, results["results"]
    samples = results["samples"]["tiny_add"]
    assert len(samples) == N
    # The wrapper returned the decoded answer only: digits, cut at EOS.
    assert all(s["resps"][0][0].isdigit() for s in samples)


def test_wrapper_rejects_unknown_args_and_loglikelihood():
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    with pytest.raises(ValueError, match="not_an_option"):
        SpaCacheLM(pretrained=str(CHECKPOINT), policy="spa", not_an_option=1, backend="torch")
    with pytest.raises(ValueError, match="policy"):
        SpaCacheLM(pretrained=str(CHECKPOINT), policy="no_such_policy", backend="torch")
    lm = SpaCacheLM(pretrained=str(CHECKPOINT), policy="vanilla", gen_length=8, block_length=8)
    with pytest.raises(NotImplementedError, match="generatively"):
        lm.loglikelihood([])


def test_lm_eval_cli_finds_model_through_the_hook(task_dir, tmp_path):
    """The stock lm_eval CLI entry point, with the .pth hook in a site dir: `--model spacache` resolves."""
    from spacache_kernels.integrations.lm_eval_model import install_hook

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install_hook(str(site_dir))
    out_dir = tmp_path / "out"
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['lm_eval'] + sys.argv[2:]; "
        "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    )
    cmd = [
        sys.executable, "-c", code, str(site_dir),
        "--model", "spacache", "--model_args", MODEL_ARGS,
        "--include_path", str(task_dir), "--tasks", "tiny_add", "--batch_size", "8",
        "--output_path", str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out_dir.rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    result = json.loads(files[0].read_text())["results"]["tiny_add"]
    assert result["exact_match,none"] >= 0.75


def test_hf_tokenizer_directory(tmp_path):
    """A LLaDA-layout directory with an HF tokenizer (no char tokenizer) goes through AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM, _HFTokenizer
    from tests.models.checkpoints import LLADA_SHAPE, write_llada_checkpoint

    vocab_size, eos_id, mask_id = LLADA_SHAPE["vocab"], 124, LLADA_SHAPE["mask_id"]
    names = [chr(c) for c in range(32, 127)]  # ids 0..94: printable characters
    names += [f"<x{i}>" for i in range(len(names), vocab_size)]
    names[eos_id], names[mask_id], names[125] = "<eos>", "<mask>", "<unk>"
    core = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>").save_pretrained(
        tmp_path
    )
    write_llada_checkpoint(tmp_path)
    lm = SpaCacheLM(
        pretrained=str(tmp_path), policy="spa", gen_length=8, block_length=4, backend="torch", batch_size=2
    )
    assert isinstance(lm.tok, _HFTokenizer)
    assert lm.tok.encode("12+3=") == [names.index(c) for c in "12+3="]

    class Request:
        def __init__(self, context):
            self.args = (context, {"until": ["\n"], "do_sample": False})

    outs = lm.generate_until([Request("12+3="), Request("a longer prompt")], disable_tqdm=True)
    assert len(outs) == 2 and all(isinstance(o, str) and "\n" not in o for o in outs)
    assert len(lm.last_stats) == 1 and lm.last_stats[0].steps == 8  # one ragged (left-padded) batch


def _run_with_site(site_dir: Path, code: str, cwd: Path = ROOT, isolated: bool = False):
    """Run ``code`` in a fresh interpreter after ``site`` processed ``site_dir`` (as at startup)."""
    prelude = "import site, sys; site.addsitedir(sys.argv[1]); "
    cmd = [sys.executable, *(["-S"] if isolated else []), "-c", prelude + code, str(site_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=cwd, timeout=120)


def test_hook_startup_imports_nothing_heavy(tmp_path):
    """With the hook installed, interpreter start imports neither torch nor the package; the finder
    is in place, and lm-eval then finds `spacache` next to its own models without importing torch."""
    from spacache_kernels.integrations.lm_eval_model import install_hook

    install_hook(str(tmp_path))
    probe = (
        "import json; "
        "pkg = lambda: any(m.startswith('spacache_kernels') for m in sys.modules); "
        "state = lambda: ['torch' in sys.modules, pkg()]; "
        "at_start = state(); "
        "hooked = any(getattr(f, 'spacache_lm_eval_hook', False) for f in sys.meta_path); "
        "from lm_eval.api.registry import model_registry; "
        "print(json.dumps([at_start, hooked, 'spacache' in model_registry, 'hf' in model_registry, state()]))"
    )
    proc = _run_with_site(tmp_path, probe)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    at_start, hooked, registered, lm_eval_own, after = json.loads(proc.stdout)
    assert at_start == [False, False] and hooked
    assert registered and lm_eval_own
    assert after[0] is False  # registering is lazy: torch only when --model spacache is resolved


def test_stale_hook_is_silent_without_the_package(tmp_path):
    """After `pip uninstall`, the leftover .pth must not print anything at interpreter start."""
    from spacache_kernels.integrations.lm_eval_model import install_hook

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install_hook(str(site_dir))
    # -S: no site-packages (so no editable install), cwd outside the repository: the package is gone.
    proc = _run_with_site(site_dir, "print(len(sys.meta_path))", cwd=tmp_path, isolated=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(len(sys.meta_path))"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert proc.stdout == bare.stdout  # no finder installed


def test_hook_install_is_idempotent_and_uninstalls(tmp_path):
    """`python -m spacache_kernels.integrations.lm_eval_model install-hook` runs fine with the hook
    active (the module registers its class over the hook's placeholder), twice; `uninstall-hook`
    removes it."""
    from spacache_kernels.integrations.lm_eval_model import uninstall_hook

    run_module = (
        "import runpy; sys.argv = ['lm_eval_model'] + sys.argv[2:]; "
        "runpy.run_module('spacache_kernels.integrations.lm_eval_model', run_name='__main__', "
        "alter_sys=True); "
        "from lm_eval.api.registry import get_model; print(get_model('spacache').__module__)"
    )
    for _ in range(2):
        cmd = [sys.executable, "-c", "import site, sys; site.addsitedir(sys.argv[1]); " + run_module,
               str(tmp_path), "install-hook", str(tmp_path)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.splitlines()[-1] == "spacache_kernels.integrations.lm_eval_model"
    assert len(list(tmp_path.glob("*.pth"))) == 1
    assert uninstall_hook(str(tmp_path)) is not None and not list(tmp_path.glob("*.pth"))
    assert uninstall_hook(str(tmp_path)) is None


class _Request:
    """The part of lm-eval's Instance that generate_until reads."""

    def __init__(self, context: str, do_sample: bool = False, temperature: float = 0.0, doc_id: int = 0):
        self.args = (context, {"until": ["="], "do_sample": do_sample, "temperature": temperature})
        self.task_name, self.doc_id, self.idx = "tiny_add", doc_id, 0


def test_wrapper_follows_spacache_backend(monkeypatch):
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM
    from tests.test_generate_edges import forbid_triton

    forbid_triton(monkeypatch)
    lm = SpaCacheLM(pretrained=str(CHECKPOINT), policy="vanilla", gen_length=8, steps=8, block_length=8)
    assert lm.backend is None
    assert lm.generate_until([_Request("12+34=")], disable_tqdm=True)[0].isdigit()


def test_wrapper_repeats_differ_and_batching_keeps_samples(monkeypatch):
    """lm-eval passes a request `repeats` times: each repeat gets its own seed (derived from the
    model seed and the request), and a request samples the same at any batch size."""
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    kw = dict(pretrained=str(CHECKPOINT), policy="vanilla", gen_length=8, steps=8, block_length=8,
              backend="torch", seed=3)  # fmt: skip
    repeated = _Request("1234+5678=", do_sample=True, temperature=20.0)
    others = [_Request(f"{1000 + i}+{2000 + i}=", True, 20.0, doc_id=i + 1) for i in range(3)]
    requests = [repeated] * 4 + others
    alone = SpaCacheLM(batch_size=1, **kw).generate_until(requests, disable_tqdm=True)
    assert len(set(alone[:4])) > 1, alone
    assert SpaCacheLM(batch_size=4, **kw).generate_until(requests, disable_tqdm=True) == alone
    other_seed = SpaCacheLM(batch_size=1, **dict(kw, seed=4)).generate_until(requests, disable_tqdm=True)
    assert other_seed != alone


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gen_length=12, block_length=8), "gen_length: expected a multiple of block_length"),
        (dict(steps=3, gen_length=16, block_length=8), "steps: expected a multiple"),
        (dict(threshold=1.5), "threshold"),
        (dict(temperature="hot"), "temperature: expected a number"),
        (dict(backend="cuda"), "backend"),
        (dict(dtype="int8"), "dtype"),
        (dict(batch_size="auto"), "batch_size: 'auto' is not supported"),
        (dict(batch_size="auto:4"), "batch_size"),
        (dict(policy="spa:no-such-preset"), "presets"),
        (dict(preset="spa:no-such-preset"), "preset: expected one of"),
        (dict(preset="spa:llada-8b-gsm8k", policy="spa"), "give policy or preset, not both"),
        (dict(policy="spa", proxy_rank=0), "proxy_rank"),
        (dict(policy="spa", not_an_option=1), "not_an_option"),
        (dict(cuda_graph="maybe"), "cuda_graph: expected True or False"),
        (dict(cuda_graph="True", device="cpu"), "cuda_graph: CUDA graphs need a CUDA device"),
        (dict(cuda_graph=True, device="cpu", threshold=0.9), "cuda_graph: CUDA graphs need"),
        (dict(cuda_graph=True, device="cpu", policy="elastic"), "cuda_graph: CUDA graphs need"),
    ],
)
def test_wrapper_validates_arguments_before_loading(kwargs, match):
    """A missing checkpoint would raise FileNotFoundError: the argument error must come first."""
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    with pytest.raises(ValueError, match=match):
        SpaCacheLM(pretrained="/no/such/checkpoint", **kwargs)


def test_wrapper_accepts_every_policy_spelling():
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    for policy in ("spa:llada-8b", "fast-dllm-dual", "dllm_cache:llada-instruct"):
        lm = SpaCacheLM(pretrained=str(CHECKPOINT), policy=policy, gen_length=8, steps=8, block_length=8,
                        backend="torch")  # fmt: skip
        assert lm.generate_until([_Request("12+34=")], disable_tqdm=True)[0].isdigit()


def test_wrapper_takes_a_published_setting():
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    # The policy and the decoding of the entry; explicit decoding arguments still override it.
    lm = SpaCacheLM(pretrained=str(CHECKPOINT), preset="fast_dllm_dual:llada-8b-gsm8k", gen_length=8,
                    steps=8, block_length=8, backend="torch")  # fmt: skip
    assert lm.policy_name == "fast_dllm_dual:llada-8b-gsm8k" and lm.threshold == 0.9
    assert lm.generate_until([_Request("12+34=")], disable_tqdm=True)[0].isdigit()
    # An entry without a published decoding keeps the shared defaults.
    lm = SpaCacheLM(pretrained=str(CHECKPOINT), preset="dkv_decode:llada", gen_length=8, steps=8,
                    block_length=8, backend="torch")  # fmt: skip
    assert lm.policy_name == "dkv_decode:llada-8b" and lm.threshold is None


def test_wrapper_truncates_a_long_context_from_the_left(caplog):
    from spacache_kernels.integrations.lm_eval_model import SpaCacheLM

    lm = SpaCacheLM(pretrained=str(CHECKPOINT), policy="vanilla", gen_length=8, steps=8, block_length=8,
                    backend="torch")  # fmt: skip
    room = lm.model.config.max_positions - 8
    long_context = "7" * (room + 50) + "+12="
    with caplog.at_level("WARNING"):
        out = lm.generate_until([_Request(long_context), _Request("12+34=")], disable_tqdm=True)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert "truncating it from the left" in caplog.text
    assert lm._encode(long_context) == lm.tok.encode(long_context)[-room:]
