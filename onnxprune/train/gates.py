"""Concurrent training and layer pruning with learned Bernoulli gates (docs/algorithms.md section 5).

Every removable residual block b of a trainable copy of the graph (``onnxprune.train.bridge.GraphModule``) gets a
gate: its join computes ``x + xi_b * F_b(x)`` with ``xi_b ~ Bernoulli(theta_b)``, drawn per sample. Nothing here is
written per architecture: the join's branch operand (``ResidualBlock.branch_output``) is multiplied by the gate
through the module's ``tensor_transforms``, and a pruned block's join hands on its shortcut operand
(``GraphModule.bypass``), after which the branch's nodes are not evaluated at all.

The weights learn by AdamW on the sampled network's loss; the thetas by projected SGD on

    E_xi[loss] + sum_b theta_b * (c_b + ||w_b||^2 / (2 sigma^2 N))

with ``gate_gradient`` (an exactly unbiased one-pass estimate of E[L | xi_b = 1] - E[L | xi_b = 0]) for the first
term, then clipped into [0, 1]. A block whose theta stays under the threshold for ``patience`` steps is pruned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onnxprune.data.sources import Dataset
from onnxprune.errors import OnnxPruneError, UnavailableBackend
from onnxprune.graph.analysis import ResidualBlock, analyze_model
from onnxprune.options import GateTrainingOptions, HealingOptions
from onnxprune.progress import progress
from onnxprune.runtime.session import create_session
from onnxprune.train.bridge import GraphModule, write_back
from onnxprune.train.heal import (_tensor, augment, check_labels, distillation_loss, image_axes, schedule, split_data,
                                  step_count)

log = logging.getLogger(__name__)

TRACE_POINTS = 400  # theta samples kept for the trajectory plot, at most


# --------------------------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------------------------

def gate_gradient(losses: Tensor, xi: Tensor, theta: Tensor) -> Tensor:
    """Unbiased estimate of d E[mean loss] / d theta_b = E[L | xi_b = 1] - E[L | xi_b = 0] for every gate, from one
    batch with per-sample gates (docs/algorithms.md section 5).

    ``losses`` (n,): each sample's loss; ``xi`` (B, n): the gate values each sample saw; ``theta`` (B,). For gate b,
    the mean loss of the samples that had it open less the mean loss of those that had it closed; given which
    samples had it open, each mean is unbiased for its conditional expectation (the samples' data and other gates
    are independent of gate b). A batch where every sample had the gate open (or every one closed) says nothing:
    it gives 0, and the others are divided by the probability 1 - theta^n - (1 - theta)^n of a batch with both, so
    the expectation is exactly the gradient. Gates at theta 0 or 1 are deterministic: 0. Needs samples that do not
    interact in the forward pass (true of GraphModule: BatchNormalization keeps its inference form)."""
    n = losses.numel()
    if n < 2:
        raise OnnxPruneError("the gate gradient needs at least 2 samples per batch")
    losses = losses.detach().to(torch.float64).reshape(1, -1)
    xi = xi.detach().to(torch.float64)
    theta = theta.detach().to(torch.float64).reshape(-1)
    opened = xi.sum(dim=1)
    closed = n - opened
    both = (opened > 0) & (closed > 0) & (theta > 0) & (theta < 1)
    difference = (xi * losses).sum(1) / opened.clamp_min(1) - ((1 - xi) * losses).sum(1) / closed.clamp_min(1)
    chance = 1 - theta ** n - (1 - theta) ** n
    return torch.where(both, difference / chance.clamp_min(1e-300), torch.zeros_like(theta))


# --------------------------------------------------------------------------------------------------------------------
# the gates
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Gate:
    join: str  # the block's join node
    branch: str  # the join's operand that comes from the branch (multiplied by the gate)
    shortcut: str  # the join's other operand (handed on once the block is pruned)
    params: list[str]  # ONNX names of the parameters the branch reads
    size: int  # their element count
    ancestors: list[int] = field(default_factory=list)  # gated blocks whose branch holds this one


def gateable_blocks(model: onnx.ModelProto) -> list[ResidualBlock]:
    """The removable residual blocks of ``model`` (section 0), the ones that get a gate."""
    return [b for b in analyze_model(model).residual_blocks if b.removable]


class GatedModule:
    """Bernoulli gates on the removable residual branches of ``module`` (built from the model ``blocks`` came
    from). ``sample(n)`` draws per-sample gates for the next forward pass; ``deterministic`` makes every unpruned
    gate 1 (evaluation); ``prune(b)`` removes block b from the computation."""

    def __init__(self, module: GraphModule, blocks: Sequence[ResidualBlock], theta_init: float = 0.9) -> None:
        self.module = module
        parameters = module.onnx_parameters()
        index = {b.index: i for i, b in enumerate(blocks)}
        self.gates: list[Gate] = []
        for b in blocks:
            join = module.node_named(b.join)
            if join is None or b.branch_output not in join.inputs:
                raise OnnxPruneError(f"block {b.join}: its join is not evaluated by the trainable copy, or does not "
                                     f"read {b.branch_output!r}")
            others = [name for name in join.inputs if name and name != b.branch_output]
            if len(others) != 1:
                raise OnnxPruneError(f"block {b.join}: its join has no single shortcut operand")
            names = self._branch_parameters(b, parameters)
            ancestors, parent = [], b.parent
            while parent is not None:
                if parent in index:
                    ancestors.append(index[parent])
                parent = next((a.parent for a in blocks if a.index == parent), None)
            self.gates.append(Gate(b.join, b.branch_output, others[0], names,
                                   sum(parameters[n].numel() for n in names), ancestors))
        self.theta = torch.full((len(self.gates),), float(theta_init), dtype=torch.float64)
        self.pruned = [False] * len(self.gates)
        self.xi = torch.ones(len(self.gates), 1)
        self.deterministic = False
        for i, gate in enumerate(self.gates):
            module.tensor_transforms[gate.branch] = self._transform(i)

    def _branch_parameters(self, block: ResidualBlock, parameters: dict) -> list[str]:
        """Parameters the branch's nodes read, directly or through an Identity of a parameter."""
        found: list[str] = []
        for name in block.branch_nodes:
            node = self.module.node_named(name)
            for tensor in node.inputs if node is not None else ():
                if tensor in parameters:
                    found.append(tensor)
                else:
                    source = self.module.node_named(tensor)  # an unnamed Identity is named by its output
                    if source is not None and source.op == "Identity" and source.inputs[0] in parameters:
                        found.append(source.inputs[0])
        return list(dict.fromkeys(found))

    def _transform(self, i: int) -> Callable[[Tensor], Tensor]:
        def gate(value: Tensor) -> Tensor:
            if self.deterministic or self.theta[i] >= 1:
                return value
            mask = self.xi[i]
            if value.shape[0] != mask.numel():
                raise OnnxPruneError(f"gate of {self.gates[i].join}: batch {value.shape[0]}, {mask.numel()} gates drawn")
            return value * mask.to(device=value.device, dtype=value.dtype).reshape((-1,) + (1,) * (value.dim() - 1))
        return gate

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw per-sample gates (B, n) for the next forward pass: 1 with probability theta (always 1 at theta 1)."""
        self.xi = (torch.rand(len(self.gates), n, generator=generator, dtype=torch.float64)
                   < self.theta.reshape(-1, 1)).float()
        return self.xi

    @property
    def active(self) -> list[int]:
        return [i for i, p in enumerate(self.pruned) if not p]

    def prune(self, i: int) -> list[int]:
        """Remove block i (and the gated blocks inside its branch) from the computation; the gates removed."""
        cut = [i] + [j for j, g in enumerate(self.gates) if i in g.ancestors and not self.pruned[j]]
        for j in cut:
            self.pruned[j] = True
            self.theta[j] = 0.0
            self.module.tensor_transforms.pop(self.gates[j].branch, None)
        self.module.bypass({self.gates[i].join: self.gates[i].shortcut})
        return cut

    def removed_joins(self) -> list[str]:
        """Joins of the pruned blocks that no pruned block holds (what a plan removes)."""
        return [g.join for g, p in zip(self.gates, self.pruned)
                if p and not any(self.pruned[a] for a in g.ancestors)]


def regulariser(gated: GatedModule, block_cost: float, prior_std: float, data_size: int) -> tuple[Tensor, Tensor]:
    """(the weight term to add to the loss, d R / d theta) of R = sum_b theta_b (c_b + ||w_b||^2 / (2 sigma^2 N)),
    c_b = block_cost * params_b / mean params (docs/algorithms.md section 5); pruned blocks contribute nothing."""
    parameters = gated.module.onnx_parameters()
    sizes = [g.size for g in gated.gates]
    mean = max(1.0, float(np.mean(sizes))) if sizes else 1.0
    term = torch.zeros((), device=next(iter(parameters.values())).device) if parameters else torch.zeros(())
    grad = torch.zeros(len(gated.gates), dtype=torch.float64)
    for i in gated.active:
        g = gated.gates[i]
        square = sum((parameters[n].float().square().sum() for n in g.params), torch.zeros((), device=term.device))
        weight = square / (2 * prior_std ** 2 * data_size)
        term = term + float(gated.theta[i]) * weight
        grad[i] = block_cost * g.size / mean + float(weight.detach())
    return term, grad


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class GateRunResult:
    model: onnx.ModelProto  # the trained weights written back into the unpruned model
    removed: list[str]  # joins to remove (plan.remove_blocks)
    record: dict  # what the run did: thetas per evaluation, pruning steps, speed-ups measured
    held_back: np.ndarray  # indices of the samples held back


def reinitialise(module: GraphModule) -> int:
    """Kaiming-normal weights (fan in, ReLU gain) and zero biases for every Conv, ConvTranspose, Gemm and MatMul
    with parameter weights; returns how many nodes were re-initialised."""
    parameters = module.onnx_parameters()
    count = 0
    with torch.no_grad():
        for node in module._plan:
            if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            weight = parameters.get(node.inputs[1])
            if weight is None or weight.dim() < 2:
                continue
            transposed = node.op == "MatMul" or (node.op == "Gemm" and not node.attr("transB", 0))
            nn.init.kaiming_normal_(weight, mode="fan_out" if transposed and weight.dim() == 2 else "fan_in",
                                    nonlinearity="relu")
            bias = parameters.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
            if bias is not None:
                bias.zero_()
            count += 1
    return count


def zero_branch_ends(module: GraphModule, gates: list[Gate]) -> int:
    """Zero the last weighted layer of every gated branch (its Conv, Gemm or MatMul, the bias Add after it, or a
    BatchNormalization's scale and shift): zero-init residual (Goyal et al. 2017). Each block then starts as the
    identity, and a gate's first gradients, E[L | on] - E[L | off], measure what the branch learns rather than the
    noise a random branch adds (which closes every gate at once). Returns how many branches were zeroed."""
    parameters = module.onnx_parameters()
    producer = {o: node for node in module._plan for o in node.outputs if o}
    count = 0
    with torch.no_grad():
        for gate in gates:
            node = producer.get(gate.branch)
            while node is not None and node.op == "Add":  # a bias added after a MatMul
                bias = [i for i in node.inputs if i in parameters]
                data = [i for i in node.inputs if i not in parameters]
                if len(bias) != 1 or len(data) != 1:
                    node = None
                    break
                parameters[bias[0]].zero_()
                node = producer.get(data[0])
            if node is None:
                continue
            if node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                zeroed = [i for i in node.inputs[1:] if i in parameters]
            elif node.op == "BatchNormalization":
                zeroed = [i for i in node.inputs[1:3] if i in parameters]
            else:
                continue
            for name in zeroed:
                parameters[name].zero_()
            count += bool(zeroed)
    return count


def train_prune(model: onnx.ModelProto, data: Dataset, options: GateTrainingOptions = GateTrainingOptions(),
                teacher_model: onnx.ModelProto | None = None, provider: str = "auto",
                measure: Callable[[list[str]], float] | None = None) -> GateRunResult:
    """Train ``model`` with gated residual branches on ``data`` and prune as the gates close (module docstring).

    The loss is cross-entropy on the data's labels when it has them (plus the distillation KL when a teacher is
    given), else the distillation KL at ``options.temperature`` against ``teacher_model`` (default: ``model`` as it
    is). ``measure(removed_joins)`` returns the measured speed-up of the model without those blocks; it is called
    after every pruning, and pruning stops once it reaches ``options.speedup``."""
    started = time.perf_counter()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UnavailableBackend("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    blocks = gateable_blocks(model)
    if not blocks:
        raise OnnxPruneError("train-prune: the model has no removable residual block to gate "
                             "(see: onnxprune analyze)")
    output = model.graph.output[0].name
    module = GraphModule(model, [output])
    gated = GatedModule(module, blocks, options.theta_init)
    if options.from_scratch:
        log.info(f"train-prune: {reinitialise(module)} conv/linear layers re-initialised, the last layer of "
                 f"{zero_branch_ends(module, gated.gates)} of {len(gated.gates)} gated branches at zero")
    labels = data.labels
    check_labels(labels, model)
    use_teacher = labels is None or teacher_model is not None
    teacher_source = teacher_model if teacher_model is not None else model
    teacher = create_session(teacher_source, provider) if use_teacher else None
    teacher_output = teacher_source.graph.output[0].name
    heal_options = HealingOptions(temperature=options.temperature)

    split = split_data(len(data), options.holdout, options.seed)
    batch = data.static_batch or options.batch
    input_names = list(data.inputs)
    axes = image_axes(data.inputs[input_names[0]]) if options.augment and len(input_names) == 1 else None
    layout = torch.contiguous_format
    if len(input_names) == 1 and image_axes(data.inputs[input_names[0]]) == (2, 3):
        layout = torch.channels_last
    module = module.to(device=device, memory_format=layout)
    held = data.subset(split.held_back)
    held_teacher = _logits(teacher, held, batch, teacher_output) if teacher is not None else None
    steps = step_count(options, len(split.train), batch)
    data_size = options.data_size or len(split.train)

    def loss_of(logits: Tensor, t_logits: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mean loss with gradient, each sample's loss without)."""
        if t_logits is None:
            losses = F.cross_entropy(logits, y, reduction="none")
            return losses.mean(), losses.detach()
        loss = distillation_loss([logits], [t_logits], 1.0, heal_options, y)
        with torch.no_grad():
            if logits.ndim == 2:  # the same loss, sample by sample (distillation_loss averages over the batch)
                t = options.temperature
                each = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(t_logits / t, dim=1),
                                log_target=True, reduction="none").sum(1) * t * t
                each = each + (F.cross_entropy(logits, y, reduction="none") if y is not None else 0)
            else:
                each = torch.stack([distillation_loss([logits[i:i + 1]], [t_logits[i:i + 1]], 1.0, heal_options,
                                                      None if y is None else y[i:i + 1]) for i in range(len(logits))])
        return loss, each

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        module.eval()
        gated.deterministic = True
        outs = [module({k: _tensor(v, device, layout) for k, v in b.feeds.items()})[0][:b.count].float().cpu()
                for b in held.batches(batch)]
        gated.deterministic = False
        module.train()
        logits = torch.cat(outs)
        entry = {"step": step, "epoch": step * batch / len(split.train),
                 "theta": [round(float(t), 6) for t in gated.theta], "active_nodes": module.active_nodes,
                 "pruned": sum(gated.pruned)}
        if held.labels is not None:
            y = torch.from_numpy(held.labels)
            entry["accuracy"] = float((logits.argmax(1) == y).float().mean())
            if not use_teacher:
                entry["loss"] = float(F.cross_entropy(logits, y))
        if held_teacher is not None:
            t = torch.from_numpy(held_teacher).float()
            entry["agreement"] = float((logits.argmax(1) == t.argmax(1)).float().mean())
            entry["loss"] = float(distillation_loss([logits], [t], 1.0, heal_options))
        return entry

    optimizer = torch.optim.AdamW(module.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, steps))
    every = max(1, steps // max(1, options.evaluations))
    trace_every = max(1, steps // TRACE_POINTS)
    below = [0] * len(gated.gates)
    pruned_at: dict[str, int | str] = {}
    speedups: list[dict] = []
    frozen_at = None
    history = [evaluate(0)]
    trace = [[0] + [float(t) for t in gated.theta]]
    nodes_per_step: list[int] = []
    log.info(f"train-prune: {len(gated.gates)} gated blocks, {len(split.train)} samples to train on, "
             f"{len(split.held_back)} held back; {steps} steps of {batch} on {device.type}; "
             f"loss: {'cross-entropy' if labels is not None else ''}"
             f"{' + ' if labels is not None and use_teacher else ''}{'distillation KL' if use_teacher else ''}")
    losses_seen: list[float] = []
    module.train()
    for step in progress(range(1, steps + 1), desc="train-prune"):
        rows = rng.choice(split.train, size=batch, replace=len(split.train) < batch)
        feeds = {k: data.inputs[k][rows] for k in input_names}
        if axes is not None:
            feeds[input_names[0]] = augment(feeds[input_names[0]], axes, rng)
        t_logits = None
        if teacher is not None:
            t_logits = torch.from_numpy(np.ascontiguousarray(teacher.run(feeds, [teacher_output])[0])).to(device).float()
        y = torch.from_numpy(labels[rows]).to(device) if labels is not None else None
        xi = gated.sample(batch, generator)
        before = module.nodes_evaluated
        logits = module({k: _tensor(v, device, layout) for k, v in feeds.items()})[0].float()
        nodes_per_step.append(module.nodes_evaluated - before)
        loss, each = loss_of(logits, t_logits, y)
        weight_term, reg_grad = regulariser(gated, options.block_cost, options.prior_std, data_size)
        if not torch.isfinite(loss):
            raise OnnxPruneError(f"train-prune diverged at step {step} (loss {loss.item()}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        (loss + weight_term).backward()
        optimizer.step()
        lr_schedule.step()
        losses_seen.append(loss.item())

        if frozen_at is None:
            grad = gate_gradient(each.cpu(), xi, gated.theta) + reg_grad
            active = torch.tensor([not p for p in gated.pruned])
            gated.theta = torch.where(active, (gated.theta - options.theta_lr * grad).clamp(0.0, 1.0), gated.theta)
            newly = []
            for i in gated.active:
                below[i] = below[i] + 1 if gated.theta[i] < options.threshold else 0
                if below[i] >= options.patience:
                    newly.append(i)
            for i in newly:
                if not gated.pruned[i]:
                    for j in gated.prune(i):
                        pruned_at[gated.gates[j].join] = step
                    log.info(f"train-prune: step {step}: block {gated.gates[i].join} pruned "
                             f"({sum(gated.pruned)}/{len(gated.gates)}; {module.active_nodes} nodes per pass)")
            if newly and measure is not None:
                speedup = measure(gated.removed_joins())
                speedups.append({"step": step, "removed": len(gated.removed_joins()), "speedup": speedup})
                log.info(f"train-prune: measured speed-up {speedup:.3f}x")
                if options.speedup is not None and speedup >= options.speedup:
                    frozen_at = step
                    for i in gated.active:
                        gated.theta[i] = 1.0
                    log.info(f"train-prune: {options.speedup}x reached: pruning stops, the other blocks are kept")
        if step % trace_every == 0 or step == steps:
            trace.append([step] + [float(t) for t in gated.theta])
        if step % every == 0 or step == steps:
            entry = evaluate(step)
            entry["train_loss"] = float(np.mean(losses_seen[-every:]))
            history.append(entry)
            log.info(f"train-prune: step {step}/{steps}  loss {entry['train_loss']:.4f}  pruned {sum(gated.pruned)}/"
                     f"{len(gated.gates)}  {time.perf_counter() - started:.0f} s")

    for i in gated.active:  # still open at the end: the likelier gate value decides
        if frozen_at is None and gated.theta[i] < 0.5 and not gated.pruned[i]:
            for j in gated.prune(i):
                pruned_at[gated.gates[j].join] = "end"
    trained = write_back(model, module.cpu().to(memory_format=torch.contiguous_format))
    record = {"method": "train-prune: Bernoulli gates on residual branches, trained with the weights",
              "estimator": "per-sample gates: mean loss with the gate open - mean loss with it closed, over the batch, "
                           "divided by the chance that a batch has both",
              "loss": ("cross-entropy" if labels is not None else "") + (" + " if labels is not None and use_teacher
                                                                         else "") + ("distillation KL" if use_teacher
                                                                                     else ""),
              "steps": steps, "epochs": steps * batch / len(split.train), "batch": batch, "lr": options.lr,
              "theta_lr": options.theta_lr, "theta_init": options.theta_init, "block_cost": options.block_cost,
              "prior_std": options.prior_std, "data_size": data_size, "threshold": options.threshold,
              "patience": options.patience, "from_scratch": options.from_scratch, "augment": axes is not None,
              "train_samples": int(len(split.train)), "held_back_samples": int(len(split.held_back)),
              "blocks": [g.join for g in gated.gates], "block_params": [g.size for g in gated.gates],
              "final_theta": [float(t) for t in gated.theta], "pruned_at": pruned_at,
              "removed_blocks": gated.removed_joins(), "speedups": speedups, "pruning_stopped_at": frozen_at,
              "nodes_per_step": {"first": nodes_per_step[0], "last": nodes_per_step[-1]},
              "seconds": time.perf_counter() - started, "history": history, "trace": trace}
    return GateRunResult(trained, gated.removed_joins(), record, split.held_back)


def _logits(session, data: Dataset, batch: int, output: str) -> np.ndarray:
    return np.concatenate([session.run(b.feeds, [output])[0][:b.count] for b in data.batches(batch)])
