"""The CUDA path: every backend against the reference on the GPU (TF32 off, and on within its
tolerance), NaN parity, fp16 and bf16 training; cuDNN's flat weights, the dtype it computes in, a
contiguous state under accumulation, one wait for the GPU per step, resuming across precisions.

Marked `gpu` and skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine.
Each check is a function of the device, so it reads the same as its CPU counterpart.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from conftest import InfGradients, params, quiet, tiny_config
from kernel_dtypes import KernelDtypes

from charlm.config import ModelConfig, validate_config
from charlm.models.fused import NOT_FLAT_WARNING, layer_weights
from charlm.models.layers import RecurrentStack
from charlm.models.model import CharLM
from charlm.models.registry import CELL_TYPES, lookup
from charlm.store.checkpoint import load_checkpoint, save_checkpoint
from charlm.store.metrics import read_metrics
from charlm.training import trainer as trainer_module
from charlm.training.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
KINDS = CELL_TYPES
FUSED_KINDS = [kind for kind in CELL_TYPES if lookup(kind).fused]


@pytest.fixture(autouse=True)
def tf32_flags_restored():
    """A bf16 run switches TF32 on for the process (runtime.allow_tf32): each test leaves the flags as found."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def tf32(enabled: bool):
    """float32 matmuls and cuDNN with TF32 on or off, for the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def cuda_config(text_file, model=None, **train_settings) -> dict:
    return validate_config(tiny_config(text_file, model=model or {}, train={"device": "cuda", **train_settings}))


def outputs_and_grads(stack: RecurrentStack, x: torch.Tensor, state: tuple):
    out, final = stack(x, state)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    ((out * weights).sum() + sum(s.sum() for s in final)).backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    stack.zero_grad()
    return out.detach(), [s.detach() for s in final], grads


def check_backends_agree(kind: str, device: str, atol: float = 1e-4, grad_tol: float = 1e-3) -> None:
    torch.manual_seed(3)
    stack = RecurrentStack(kind, 16, 32, 2).to(device)
    x = torch.randn(20, 8, 16, device=device)
    state = tuple(torch.randn(2, 8, 32, device=device) for _ in range(stack.state_size))
    stack.backend = "reference"
    want = outputs_and_grads(stack, x, state)
    for backend in set(stack.spec.backends) - {"reference"}:
        stack.backend = backend
        got = outputs_and_grads(stack, x, state)
        torch.testing.assert_close(got[0], want[0], atol=atol, rtol=0, msg=backend)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=backend)
        for name in want[2]:
            torch.testing.assert_close(
                got[2][name], want[2][name], atol=grad_tol, rtol=grad_tol, msg=f"{backend} {name}"
            )


def check_nan_parity(kind: str, device: str) -> None:
    torch.manual_seed(5)
    stack = RecurrentStack(kind, 6, 8, 2).to(device)
    x = torch.randn(7, 3, 6, device=device)
    x[2, 1, 0] = float("nan")
    patterns = {}
    for backend in stack.spec.backends:
        stack.backend = backend
        with torch.no_grad():
            out, final = stack(x, stack.init_state(3, device=device))
        patterns[backend] = (torch.isnan(out).cpu(), [torch.isnan(s).cpu() for s in final])
    assert patterns["reference"][0].any() and not patterns["reference"][0].all()
    for backend in set(patterns) - {"reference"}:
        assert torch.equal(patterns[backend][0], patterns["reference"][0]), backend
        assert all(torch.equal(a, b) for a, b in zip(patterns[backend][1], patterns["reference"][1])), backend


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_cuda(kind):
    with tf32(False):
        check_backends_agree(kind, "cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_backends_agree_on_cuda_within_tf32_tolerance(kind):
    """torch's defaults let cuDNN (so the fused backend) use TF32, 10 mantissa bits: ~1e-3 relative."""
    with tf32(True):
        check_backends_agree(kind, "cuda", atol=2e-2, grad_tol=5e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_comes_out_nan_in_every_backend_on_cuda(kind):
    check_nan_parity(kind, "cuda")


def test_fp16_on_cuda_skips_overflows_and_shrinks_the_scale(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(trainer_module.Trainer, "loss", staticmethod(InfGradients({3, 4})))
    cfg = validate_config(tiny_config(text_file, train={"device": "cuda", "precision": "fp16", "max_steps": 8}))
    outcome = train(cfg, tmp_path / "run", display=quiet())
    assert outcome.step == 8
    assert [m["step"] for m in read_metrics(tmp_path / "run") if m["event"] == "skip"] == [3, 4]
    scale = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale == torch.amp.GradScaler("cuda").get_scale() * 0.25


@pytest.mark.parametrize("backend", ["native", "fused"])
def test_bf16_on_cuda_learns_as_fp32_does(tmp_path, text_file, backend):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = validate_config(
            tiny_config(
                text_file,
                model={"backend": backend, "hidden_size": 32},
                train={"device": "cuda", "precision": precision, "max_steps": 40, "eval_interval": 40, "lr": 0.02},
            )
        )
        losses[precision] = train(cfg, tmp_path / precision, display=quiet()).best_val_loss
    assert losses["bf16"] < math.log(len(set(text_file.read_text()))) - 1.0, losses
    assert abs(losses["bf16"] - losses["fp32"]) < 0.1, losses


def test_accumulation_with_weight_dropout_equals_the_full_batch_on_cuda(tmp_path, text_file):
    model = {"num_layers": 2, "weight_dropout": 0.3}
    for name, steps in (("full", 1), ("acc", 4)):
        cfg = validate_config(
            tiny_config(
                text_file,
                model=model,
                train={"device": "cuda", "batch_size": 8, "max_steps": 5, "gradient_accumulation_steps": steps},
            )
        )
        train(cfg, tmp_path / name, display=quiet())
    full, acc = params(tmp_path / "full"), params(tmp_path / "acc")
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-5, rtol=0, msg=name)


# --- cuDNN: flat weights, the dtype it computes in, a contiguous state ------------------------------


def shares_one_storage(model: CharLM) -> bool:
    weights = layer_weights(model.rnn.cells, [cell.weight_hh for cell in model.rnn.cells])
    return len({w.untyped_storage().data_ptr() for w in weights}) == 1


def not_flat_warnings(run) -> list[str]:
    """cuDNN's warnings about weights outside its flat buffer while `run()` runs (every time, not once)."""
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.set_warn_always(always)
    return [str(w.message) for w in caught if NOT_FLAT_WARNING in str(w.message)]


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_weights_move_into_one_cudnn_buffer_on_cuda(kind):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(type=kind, hidden_size=32, num_layers=2), 11, "fused")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.to("cuda")
    assert shares_one_storage(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[name].cpu(), before[name]) for name in before)
    x = torch.randint(0, 11, (4, 9), device="cuda")
    assert not_flat_warnings(lambda: model(x)[0].sum().backward()) == []  # cuDNN read the buffer in place


def trainers_built(monkeypatch) -> list:
    built, real_init = [], trainer_module.Trainer.__init__

    def spy_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy_init)
    return built


def test_training_keeps_the_flat_buffer_that_the_average_follows_on_cuda(tmp_path, text_file, monkeypatch):
    """Weight dropout hands cuDNN a masked weight_hh (a copy per call, no warning); validation and a
    resume (load_state_dict copies into the weights) read the buffer in place."""
    built = trainers_built(monkeypatch)
    model = {"backend": "fused", "num_layers": 2, "weight_dropout": 0.3}

    def train_then_resume() -> None:
        for steps, resume in ((4, False), (6, True)):
            cfg = cuda_config(text_file, model, ema_decay=0.9, max_steps=steps, eval_interval=2)
            train(cfg, tmp_path / "run", resume=resume, display=quiet())

    assert not_flat_warnings(train_then_resume) == []
    assert len(built) == 2
    for trainer in built:
        assert shares_one_storage(trainer.model)
        live = dict(zip(trainer.ema.names, trainer.ema._live))
        assert all(live[name].data_ptr() == p.data_ptr() for name, p in trainer.model.named_parameters())


def test_fused_accumulation_with_two_layers_equals_the_full_batch_on_cuda(tmp_path, text_file):
    """A micro-batch's rows of the [L, B, H] state are strided; cuDNN needs them contiguous."""
    with tf32(False):
        for name, steps in (("full", 1), ("acc", 2)):
            cfg = cuda_config(
                text_file,
                {"backend": "fused", "num_layers": 2},
                batch_size=8,
                max_steps=5,
                gradient_accumulation_steps=steps,
            )
            train(cfg, tmp_path / name, display=quiet())
    full, acc = params(tmp_path / "full"), params(tmp_path / "acc")
    for name in full:
        torch.testing.assert_close(acc[name], full[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize(
    "precision,computed", [("fp32", torch.float32), ("bf16", torch.float32), ("fp16", torch.float16)]
)
def test_the_cudnn_recurrence_runs_in_the_dtype_its_precision_calls_for(
    tmp_path, text_file, monkeypatch, precision, computed
):
    """Under bf16 autocast cuDNN would run fp16 (without loss scaling): the recurrence runs in
    float32 with TF32 instead. fp16 keeps cuDNN's fp16 path, with its GradScaler."""
    record, real = KernelDtypes("_cudnn_rnn"), trainer_module.Trainer.forward_backward

    def recorded(self, *args):
        with record:
            return real(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "forward_backward", recorded)
    train(
        cuda_config(text_file, {"backend": "fused", "num_layers": 2}, precision=precision, max_steps=2),
        tmp_path / "run",
        display=quiet(),
    )
    assert record.seen and {dtype for _, dtype in record.seen} == {computed}, record.seen
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "bf16")  # set by the run for bf16 only


@pytest.mark.parametrize("kind", ["lstm", "mingru"])
def test_auto_runs_cudnn_on_cuda_where_torch_has_a_kernel(tmp_path, text_file, kind):
    train(cuda_config(text_file, {"type": kind}, max_steps=2), tmp_path / "run", display=quiet())
    assert load_checkpoint(tmp_path / "run" / "last.pt")["backend"] == ("fused" if lookup(kind).fused else "native")


# --- the loop: one wait per step, resuming across precisions -------------------------------------


def syncs_per_step(monkeypatch) -> list[list[str]]:
    """Per training step, where each synchronizing CUDA call came from ("file:line" of the Python
    line that made it), as torch's sync debug mode reports them."""
    counts, real = [], trainer_module.Trainer.train_step

    def counted(self):
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(self)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                counts.append(
                    [
                        f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"
                        for w in caught
                        if "synchronizing CUDA operation" in str(w.message)
                    ]
                )

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted)
    return counts


@pytest.mark.parametrize("precision,most", [("fp32", 1), ("bf16", 1), ("fp16", 2)])
def test_a_training_step_waits_for_the_gpu_once_on_cuda(
    tmp_path, text_file, monkeypatch, record_property, precision, most
):
    """The finiteness check is the step's one read (fp16: GradScaler.step reads its inf flag too).
    The first steps may add lazy set-up; logging and evaluation, which read on purpose, are off."""
    syncs = syncs_per_step(monkeypatch)
    train(
        cuda_config(
            text_file, {"backend": "fused"}, precision=precision, max_steps=8, log_interval=1000, eval_interval=1000
        ),
        tmp_path / "run",
        display=quiet(),
    )
    record_property(f"syncs_per_step_{precision}", syncs)
    assert len(syncs) == 8 and max(len(step) for step in syncs[2:]) <= most, syncs


def test_syncs_per_step_at_the_benchmark_shape_on_cuda(tmp_path, text_file, monkeypatch, record_property):
    """LSTM 2x256, B=32, T=128: recorded (junit property) rather than asserted, since torch's own
    kernels at this size (embedding backward over B*T indices, say) may read the device too."""
    syncs = syncs_per_step(monkeypatch)
    text_file.write_text(text_file.read_text() * 8)
    cfg = cuda_config(
        text_file,
        {"hidden_size": 256, "num_layers": 2},
        batch_size=32,
        seq_len=128,
        max_steps=5,
        log_interval=1000,
        eval_interval=1000,
    )
    train(cfg, tmp_path / "run", display=quiet())
    record_property("syncs_per_step_lstm_2x256_B32_T128", syncs)
    assert len(syncs) == 5


@pytest.mark.parametrize("first,then", [("fp16", "fp32"), ("bf16", "fp32"), ("fp32", "fp16")])
def test_a_carried_state_resumes_across_precisions_on_cuda(tmp_path, text_file, first, then):
    """cuDNN's fp16 autocast path returns an fp16 state, which a run saves; an fp32 kernel refuses it
    unless the resume casts it to the model's dtype (also for a state saved half by an older run)."""
    model, run_dir = {"backend": "fused", "num_layers": 2}, tmp_path / "run"
    train(cuda_config(text_file, model, precision=first, max_steps=3), run_dir, display=quiet())
    payload = load_checkpoint(run_dir / "last.pt")
    if first == "bf16":  # this run carries float32 now; make it the half state an older charlm saved
        payload["train_state"] = [s.half() for s in payload["train_state"]]
        save_checkpoint(payload, run_dir / "last.pt")
    assert (
        train(cuda_config(text_file, model, precision=then, max_steps=5), run_dir, resume=True, display=quiet()).step
        == 5
    )
