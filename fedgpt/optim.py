"""AdamW on torch's fused kernel, without torch.optim's start-up cost; and Muon beside it (MuonAdamW).

torch.optim.Optimizer wraps add_param_group in torch._disable_dynamo, so constructing any torch optimizer
imports torch._dynamo, seconds of CPU in every process that trains: each Ray actor of a simulation, and in a
deployment each ClientApp process, every round. FusedAdamW calls the kernel that torch.optim.AdamW(fused=True)
calls, on the same state, so its steps are bitwise equal to torch's and state dicts load either way.
"""

import functools

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


class MuonAdamW:
    """Muon (torch.optim.Muon: momentum, then Newton-Schulz orthogonalization) for the 2-D weight matrices of
    the transformer blocks, AdamW for everything else (embeddings, head, norms, biases), as Muon's authors use
    it; one optimizer to the trainer: one list of param groups (setting a group's lr sets it), one step, one
    state dict. Muon's step is scaled as Moonshot's (0.2 sqrt(max dim)), so that it takes AdamW's learning
    rate and weight decay."""

    def __init__(self, matrices: list, rest: list[dict], lr: float, betas: tuple, weight_decay: float):
        # matrices: Muon's; rest: AdamW's param groups (with their own weight decay)
        self.muon = torch.optim.Muon(
            matrices,
            lr=lr,
            weight_decay=weight_decay,
            momentum=0.95,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        device = matrices[0].device.type if matrices else "cpu"
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
