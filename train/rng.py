"""The random streams that shape a training step, owned by the trainer.

- **mask**: a ``torch.Generator`` on the device draws each micro-batch's mask noise
  ``(B, L)``, passed to the model explicitly.
- **model**: what the model itself draws from torch's global RNG (dropout,
  drop-path, anything added later) comes from a state we keep: it is swapped in
  around each forward (``torch.random.fork_rng``) and read back after.
- **augmentation** is not here: crops and flips come from a per-sample RNG keyed by
  (plan seed, epoch, sample id) in the pipeline, unchanged by workers, ranks or resume.

Both streams are seeded from (seed, rank, stream) and saved in every checkpoint
(``rng_rank*.safetensors``). Nothing else — a DataLoader iterator seeding its
workers, a library drawing at import — can shift them, so a resumed run draws
exactly what the uninterrupted one drew. On another world size (elastic resume)
the saved streams do not map onto the new ranks; fresh ones are derived from
(seed, rank, resumed step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

MASK, MODEL = 0, 1


def stream_seed(seed: int, rank: int, stream: int, step: int = 0) -> int:
    """A well-mixed 63-bit seed per (seed, rank, stream, step)."""
    return int(np.random.SeedSequence([seed, rank, stream, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class StepStreams:
    def __init__(self, seed: int, rank: int, device: torch.device, step: int = 0) -> None:
        self.device = device
        self.mask = torch.Generator(device=device)
        self.mask.manual_seed(stream_seed(seed, rank, MASK, step))
        model = torch.Generator(device=device)
        model.manual_seed(stream_seed(seed, rank, MODEL, step))
        self.model_state = model.get_state()

    def mask_noise(self, batch: int, num_patches: int) -> torch.Tensor:
        """Uniform noise (batch, num_patches) on the device: argsort picks the kept patches."""
        return torch.rand(batch, num_patches, generator=self.mask, device=self.device)

    @contextlib.contextmanager
    def model_stream(self) -> Iterator[None]:
        """Run the block on the model stream; the global RNG is left as it was."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type=self.device.type):
            if cuda:
                torch.cuda.set_rng_state(self.model_state, self.device)
            else:
                torch.set_rng_state(self.model_state)
            yield
            self.model_state = torch.cuda.get_rng_state(self.device) if cuda else torch.get_rng_state()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask.get_state(), "model": self.model_state.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"mask", "model"} or any(t.dtype != torch.uint8 for t in state.values()):
            raise ValueError(f"random-stream state has keys {sorted(state)}; expected uint8 'mask' and 'model'")
        sizes = {"mask": self.mask.get_state().numel(), "model": self.model_state.numel()}
        if any(state[k].shape != (n,) for k, n in sizes.items()):  # a generator refuses any other, with a traceback
            raise ValueError(f"random-stream state has sizes {[tuple(state[k].shape) for k in sizes]}; "
                             f"a {self.device.type} generator's are {list(sizes.values())}")
        self.mask.set_state(state["mask"])
        self.model_state = state["model"].clone()
