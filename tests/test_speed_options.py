"""Training speed options: `model.compile` and `model.checkpoint_activations` change speed and memory, not results."""

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from tests.conftest import compose_config
from tests.test_module import TINY, fit, sine_batch
from wavenet import WaveNet, WaveNetModule
from wavenet.ema import EMA

# Many layers against a small head, as in the real sizes (the head's memory does not change).
DEEP = dict(layers=12, stacks=2, residual_channels=32, dilation_channels=32, skip_channels=16, quantization_channels=64)


# Inductor compiles C++ for each layer's kernels (their sizes differ with the dilation): each one took ~1.7 s on
# 2 cores with its cache empty, as in CI (TINY's 6 layers: 81 s for the test below). Two layers have kernels of
# every kind a deeper network has.
COMPILED = dict(TINY, layers=2, stacks=1)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (inductor runs once per graph)."""
    return counters["stats"]["unique_graphs"]


def loss_and_grads(model: WaveNet, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs, causal_pad=False), targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def pair(shape: dict, **options: bool) -> tuple[WaveNet, WaveNet]:
    """A plain network of `shape` and one with the same weights built with `options`."""
    torch.manual_seed(0)
    plain = WaveNet(**shape)
    other = WaveNet(**shape, **options)
    other.load_state_dict(plain.state_dict())
    return plain, other


def random_batch(model: WaveNet, chunk: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, model.quantization_channels, (2, model.receptive_field - 1 + chunk), generator=generator)
    return inputs, torch.randint(0, model.quantization_channels, (2, chunk), generator=generator)


def saved_for_backward(model: WaveNet, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes the autograd graph keeps from forward to backward (each storage once), loss included."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    # Non-reentrant checkpointing keeps each layer's input through autograd as well, so it is counted here.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(model(inputs, causal_pad=False), targets)
    return sum(storages.values())


def test_checkpointed_layers_give_the_same_loss_and_gradients():
    plain, checkpointed = pair(DEEP, checkpoint_activations=True)
    batch = random_batch(plain)
    loss, grads = loss_and_grads(plain, *batch)
    checkpointed_loss, checkpointed_grads = loss_and_grads(checkpointed, *batch)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
    with torch.no_grad():  # validation and generation: no checkpointing, same logits
        torch.testing.assert_close(checkpointed(batch[0]), plain(batch[0]), rtol=1e-6, atol=1e-9)


def test_checkpointing_stores_far_fewer_activations():
    plain, checkpointed = pair(DEEP, checkpoint_activations=True)
    batch = random_batch(plain)
    # Per step, a plain layer keeps its input (R channels), tanh and sigmoid of the filter and gate (D each)
    # and their product (D): R + 3D = 4R here; a checkpointed one keeps its input alone. The head and the
    # loss keep the same in both, which brings the factor for this shape to 3.5.
    factor = saved_for_backward(plain, *batch) / saved_for_backward(checkpointed, *batch)
    assert factor > 3.2, f"checkpointing saved only a factor of {factor:.2f}"


def test_speed_options_reach_the_module_from_the_config(tmp_path):
    cfg = compose_config("train", ["model=tiny", "model.compile=true", "model.checkpoint_activations=true"], tmp_path)
    module = instantiate(cfg.model)
    assert module.hparams.compile and module.model.checkpoint_activations
    defaults = instantiate(compose_config("train", ["model=tiny"], tmp_path).model)
    assert not defaults.hparams.compile and not defaults.model.checkpoint_activations


def test_checkpoint_from_before_the_speed_options_loads(tmp_path):
    module = WaveNetModule(**TINY)
    batch = sine_batch(module.receptive_field)
    trainer = fit(module, batch, max_steps=1, limit_val_batches=0)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    for key in ("compile", "checkpoint_activations"):
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, path)
    loaded = WaveNetModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.compile is False and loaded.model.checkpoint_activations is False
    torch.testing.assert_close(loaded.state_dict(), module.state_dict())


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        self.train.append(outputs["loss"].item())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val.append(trainer.callback_metrics["val/loss"].item())


@pytest.mark.slow  # inductor compiles C++ for three graphs: about 45 s on a 2-core CPU, its cache empty
def test_compiled_training_matches_eager_and_its_checkpoint_loads_uncompiled(tmp_path, caplog):
    torch.compiler.reset()
    caplog.set_level(logging.INFO, logger="wavenet")
    runs = {}
    for compiled in (False, True):
        L.seed_everything(0)
        module = WaveNetModule(**COMPILED, lr=1e-2, warmup_steps=1, decay="constant", compile=compiled)
        batch = sine_batch(module.receptive_field, batch=3)
        losses = RecordLosses()
        graphs = compiled_graphs()
        caplog.clear()
        # Validation on the EMA's weights, swapped in under the compiled code; a val batch of 2 after one of 3
        # is the smaller last batch of a real validation set.
        trainer = fit(
            module,
            batch,
            max_steps=4,
            val_check_interval=2,
            val_batch_size=2,
            callbacks=[EMA(decay=0.9), losses],
        )
        runs[compiled] = module, trainer, losses
        assert (compiled_graphs() > graphs) == compiled
        assert ("first training and validation steps compile" in caplog.text) == compiled  # not a silent minute
    (eager, _, eager_losses), (module, trainer, losses) = runs[False], runs[True]
    assert len(losses.train) == 4 and len(losses.val) == 3  # Lightning's sanity check, then steps 2 and 4
    torch.testing.assert_close(losses.train, eager_losses.train, rtol=1e-4, atol=0)
    torch.testing.assert_close(losses.val, eager_losses.val, rtol=1e-4, atol=0)

    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    loaded = WaveNetModule.load_from_checkpoint(path, map_location="cpu")  # no Trainer: stays eager
    assert loaded.hparams.compile
    assert list(loaded.state_dict()) == list(eager.state_dict()) == list(module.state_dict())
    torch.testing.assert_close(loaded.state_dict(), module.state_dict())
    graphs = compiled_graphs()
    with torch.no_grad():
        loaded(batch[0])
    assert compiled_graphs() == graphs, "a module loaded without a Trainer compiled"


def test_compiled_checkpointed_network_matches_eager_and_stores_less():
    # Three layers, wide, so that they outweigh the head. What a compiled network keeps for backward is decided
    # before inductor generates code, by AOT autograd's partitioner: `aot_eager_decomp_partition` runs the same one,
    # then torch's own kernels, in 3 s, where inductor's C++ took 40 s with its cache empty (and 80 s for 6 layers).
    # Both keep 0.57 of the plain network's activations for this shape (eager: 0.23); compiled without
    # checkpointing, as much as eager (1.0). The test above trains with inductor.
    shape = dict(DEEP, layers=3, stacks=1, residual_channels=64, dilation_channels=64)
    plain, both = pair(shape, checkpoint_activations=True)
    both.compile(backend="aot_eager_decomp_partition")
    batch = random_batch(plain, chunk=64)
    graphs = compiled_graphs()
    # Compiled code saves through autograd too. Checkpointing is traced into the graph (one graph, no break)
    # and honoured.
    assert saved_for_backward(both, *batch) < 0.75 * saved_for_backward(plain, *batch)
    assert compiled_graphs() == graphs + 1
    loss, grads = loss_and_grads(plain, *batch)
    compiled_loss, compiled_grads = loss_and_grads(both, *batch)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
