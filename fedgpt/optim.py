"""AdamW on torch's fused kernel, without torch.optim's start-up cost; and Muon beside it (MuonAdamW).

torch.optim.Optimizer wraps add_param_group in torch._disable_dynamo, so constructing any torch optimizer
imports torch._dynamo, seconds of CPU in every process that trains: each Ray actor of a simulation, and in a
deployment each ClientApp process, every round. FusedAdamW calls the kernel that torch.optim.AdamW(fused=True)
calls, on the same state, so its steps are bitwise equal to torch's and state dicts load either way.
"""

import functools
import math

import torch

GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")
# What this optimizer is in torch.optim.AdamW's terms: saved with each group so that torch, loading our state,
# runs the same fused kernel (torch reads a missing "fused" as not fused).
TORCH_GROUP = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": True,
}


@functools.cache
def fused_supported(device_type: str) -> bool:
    """Whether this torch has the fused AdamW kernel for device_type (CPU since torch 2.4)."""
    try:
        p = torch.zeros(1, device=device_type)
        torch._fused_adamw_(
            [p],
            [p.clone()],
            [p.clone()],
            [p.clone()],
            [],
            [torch.zeros((), device=device_type)],
            lr=0.0,
            beta1=0.9,
            beta2=0.95,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


class FusedAdamW:
    """Decoupled-weight-decay Adam over param groups, each with lr, betas, eps and weight_decay.

    The parts of torch.optim's interface that fedgpt and torch.amp.GradScaler use: param_groups, state, step,
    zero_grad, state_dict and load_state_dict (torch's layout: state and groups keyed by parameter index).
    """

    def __init__(self, param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float = 1e-8):
        self.param_groups = [
            {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": 0.0,
                **g,
                "params": list(g["params"]),
            }
            for g in param_groups
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            # The kernel takes lists of one device and dtype (as torch groups them).
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for params in by_kind.values():
                states = [self.state.get(p) or self._new_state(p) for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1)
                beta1, beta2 = group["betas"]
                torch._fused_adamw_(
                    params,
                    [p.grad for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [],
                    steps,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    amsgrad=False,
                    maximize=False,
                )

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        # As torch's fused AdamW: the step count is a float32 scalar on the parameter's device.
        s = {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
        self.state[p] = s
        return s

    def _index(self) -> dict[torch.Tensor, int]:
        return {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self) -> dict:
        index = self._index()
        return {
            "state": {index[p]: dict(s) for p, s in self.state.items()},
            "param_groups": [
                {**{k: g[k] for k in GROUP_KEYS}, **TORCH_GROUP, "params": [index[p] for p in g["params"]]}
                for g in self.param_groups
            ],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of torch.optim.AdamW built over the same groups."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                "optimizer state was saved for other parameter groups: "
                "resume with the model it was saved with"
            )
        by_index = {
            i: p for saved, g in zip(groups, self.param_groups) for i, p in zip(saved["params"], g["params"])
        }
        for saved, g in zip(groups, self.param_groups):
            g.update({k: tuple(saved[k]) if k == "betas" else saved[k] for k in GROUP_KEYS if k in saved})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            # Copies: stepping must not write into the caller's tensors (another optimizer's state, a
            # checkpoint).
            self.state[p] = {
                "step": torch.as_tensor(s["step"]).to(p.device, torch.float32, copy=True),
                "exp_avg": s["exp_avg"].to(p.device, p.dtype, copy=True),
                "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype, copy=True),
            }


class _States:
    """The state of MuonAdamW's two optimizers, cleared together (a client starting fresh moments)."""

    def __init__(self, *states: dict):
        self.states = states

    def clear(self) -> None:
        for s in self.states:
            s.clear()

    def __len__(self) -> int:
        return sum(len(s) for s in self.states)


FIRST_MOMENTS = ("momentum_buffer", "exp_avg")  # Muon's momentum, AdamW's first moment


def _states(optimizer) -> tuple[dict, ...]:
    state = optimizer.state
    return state.states if isinstance(state, _States) else (state,)


def first_moments(optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each stepped parameter's first moment (Muon's momentum buffer, AdamW's exp_avg), by the parameter's
    name in `model`; parameters without state (frozen, or not stepped yet) are left out."""
    states, moments = _states(optimizer), {}
    for name, p in model.named_parameters():
        for state in states:
            s = state.get(p) or {}  # .get: a defaultdict state must not grow entries here
            key = next((k for k in FIRST_MOMENTS if k in s), None)
            if key is not None:
                moments[name] = s[key]
    return moments


def load_first_moments(optimizer, model: torch.nn.Module, moments: dict[str, torch.Tensor]) -> int:
    """Overwrite the first moments of the parameters that have state with `moments` (by name), leaving the
    rest of the state (AdamW's second moment and step) as it is. Returns how many were set."""
    own = first_moments(optimizer, model)
    for name, m in own.items():
        if name not in moments or moments[name].shape != m.shape:
            raise ValueError(f"the shared moments lack {name} or differ in shape: a client of another model?")
        m.copy_(moments[name])
    return len(own)


@functools.cache
def muon_defaults() -> dict:
    """torch.optim.Muon's defaults: its Newton-Schulz coefficients and steps, eps, momentum."""
    return torch.optim.Muon([torch.zeros(1, 1, requires_grad=True)]).defaults


def orthogonalize(g: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype):
    """Muon's Newton-Schulz iteration (torch.optim.Muon's, quintic, `steps` times) in `dtype`: an
    approximation of U V^T for g = U S V^T."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its orthogonalization in `ns_dtype`. torch's runs it in bf16, right for a GPU;
    on a CPU without bf16 matrix units a bf16 matmul is about 10x slower than fp32 (128 x 512: 19 ms against
    2 ms on one core here), which made Muon's step 14x AdamW's. With ns_dtype bf16 this is torch's own step;
    the state (a momentum buffer per matrix) is torch's either way. Moonshot's scaling only
    (adjust_lr_fn="match_rms_adamw")."""

    def __init__(self, params, ns_dtype: torch.dtype, **kwargs):
        super().__init__(params, adjust_lr_fn="match_rms_adamw", **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, mom = group["lr"], group["momentum"]
            for p, grad, buf in zip(params, grads, buffers):
                buf.lerp_(grad, 1 - mom)
                update = grad.lerp(buf, mom) if group["nesterov"] else buf
                update = orthogonalize(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape[:2])))
        return None


class MuonAdamW:
    """Muon (torch.optim.Muon's: momentum, then Newton-Schulz orthogonalization, in fp32 off CUDA) for the 2-D
    weight matrices of the transformer blocks, AdamW for everything else (embeddings, head, norms, biases), as
    Muon's authors use it; one optimizer to the trainer: one list of param groups (setting a group's lr sets
    it), one step, one state dict. Muon's step is scaled as Moonshot's (0.2 sqrt(max dim)), so that it takes
    AdamW's learning rate and weight decay."""

    def __init__(
        self,
        matrices: list,
        rest: list[dict],
        lr: float,
        betas: tuple,
        weight_decay: float,
        momentum: float,
    ):
        # matrices: Muon's; rest: AdamW's param groups (with their own weight decay)
        device = matrices[0].device.type if matrices else "cpu"
        ns_dtype = torch.bfloat16 if device == "cuda" else torch.float32  # see Muon
        self.muon = Muon(
            matrices, ns_dtype, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True
        )
        self.adamw = (
            FusedAdamW(rest, lr=lr, betas=betas)
            if fused_supported(device)
            else torch.optim.AdamW(rest, lr=lr, betas=betas)
        )

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: torch's load_state_dict replaces Muon's group dicts, and a list kept from
        # before would set the learning rate of groups no longer in use.
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> _States:
        return _States(self.muon.state, self.adamw.state)

    def zero_grad(self) -> None:
        self.muon.zero_grad(set_to_none=True)
        self.adamw.zero_grad()

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("optimizer state was saved by another optimizer than train.optimizer=muon")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
