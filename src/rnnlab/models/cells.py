"""rnnlab's own GRU, LSTM and RNN, written from their gate equations.

Each class is a drop-in for its torch.nn counterpart: the same constructor arguments in
torch's order (rnnlab's own options keyword-only), attributes, exception classes, and
parameter names and shapes (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`,
the LSTM's `weight_hr_l0` with projections, `..._reverse`), so `load_state_dict` works in
both directions, and the same call (`output, h_n = gru(x, h_0)`; the LSTM returns
`(h_n, c_n)`), with a `PackedSequence` or a padded batch plus `lengths` for variable
lengths. With the same seed they even draw the same initial weights as torch. Two options
torch lacks, off by default:

- `recurrent_dropout`: variational dropout on the hidden-to-hidden path (Gal & Ghahramani,
  2016; Keras' `recurrent_dropout`): one mask per sequence, reused at every step (on the
  proj_size-wide h of an LSTM with projections);
- `layer_norm`: layer normalisation of each gate's input and hidden pre-activations
  (Ba et al., 2016), with a gain and bias per gate unit.

The gate equations of each cell are written in the `forward` of its scan below (`_GRUScan`,
`_LSTMScan`, `_RNNScan`), fused and in place, with their hand-derived derivatives in `backward`;
and again in plain torch ops in its `step`, for the gradients autograd must be able to
differentiate (a backward with create_graph=True) or batch (vmap over the backward): those are
recomputed from the saved inputs through `step` and differentiated by autograd (`_Scan`).
What makes the first path fast on a CPU (each measured against its alternative):

- the input half of every gate pre-activation, W_ih x_t + b_ih, is one matmul over all
  steps before the loop, which leaves one small matmul per step (W_hh h_{t-1});
- the loop runs inside a custom `torch.autograd.Function`: autograd records one node per
  layer and direction instead of a dozen per step, the backward loop does one matmul and a
  handful of element-wise ops per step, and the gradients of W_hh and b_hh are one matmul
  and one sum over all steps after the loop;
- the forward writes each step's gates into views of a few buffers (one step's worth,
  reused, when no gradient is needed); the backward computes each step's gate derivatives
  on small tensors that stay in cache;
- sequences are stored packed (time-major, longest first): step t touches only the
  sequences still running, so a variable-length batch costs the steps it contains.

Measured and left out: TorchScript (no gain), `torch.compile` of the per-step gate math (no
faster than the in-place eager ops here, after a 20 s compile per shape), tanh computed as
2·sigmoid(2x) - 1 (no gain), and the backward's gate derivatives computed for all steps at
once (slower: memory-bound, and fresh large buffers cost page faults).

Where `python -m rnnlab.models.fused build` (`make install` runs it) has built fused_scan.cpp, each scan's loop over
the steps runs in C++ instead (`_kernels`): the same matmul per step, then one pass over the gate arithmetic, with the
same arguments and intermediates. Layer norm, recurrent dropout, the LSTM's projection and dtypes other than float and
double keep the Python loops; RNNLAB_FUSED=0 turns the C++ loops off. Speed: docs/cells.md (`python -m rnnlab.bench`).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnlab.errors import ConfigError, DataError
from rnnlab.models import fused

LAYER_NORM_EPS = 1e-5


# Each error is the class torch.nn's cells raise for the same mistake, so `except ValueError` in code written
# for torch still catches it, and rnnlab's, so the command line prints it as a one-line error.
class CellValueError(ConfigError, ValueError):
    """A cell argument or input torch refuses with ValueError (a size <= 0, dropout, a dtype mismatch)."""


class CellTypeError(ConfigError, TypeError):
    """A cell argument of the wrong type, which torch refuses with TypeError (bias=1, hidden_size=2.5)."""


class CellInputError(DataError, RuntimeError):
    """An input or state torch refuses with RuntimeError (feature size, state shape, no time steps)."""


class CellInputValueError(DataError, ValueError):
    """An input torch refuses with ValueError (its rank), or rnnlab's `lengths` given beside a PackedSequence."""


# Per layer and direction, with suffix _l{layer}[_reverse]; the ln_ ones exist only with layer_norm=True.
PARAMETERS = ("weight_ih", "bias_ih", "weight_hh", "bias_hh", "ln_weight_ih", "ln_bias_ih", "ln_weight_hh", "ln_bias_hh")


class _Layout:
    """Where each step's rows live in the packed, time-major layout.

    Step t holds the first `batch_sizes[t]` sequences (longest first), so the state a
    step starts from is a prefix of the previous step's rows. State buffers carry B extra
    rows in front for the initial state: row blocks [h_0, h_1, ..., h_T], so "the previous
    state" needs no special case at t = 0.
    """

    def __init__(self, batch_sizes: Sequence[int], device: torch.device) -> None:
        self.batch_sizes = tuple(int(b) for b in batch_sizes)
        self.batch = self.batch_sizes[0]
        self.rows = sum(self.batch_sizes)
        self.device = device
        self.full = all(b == self.batch for b in self.batch_sizes)
        # Whether the caller records a graph. Inside a Function's forward grad mode is always off, and
        # ctx.needs_input_grad is true under torch.no_grad() too: the scans read this to keep one step's intermediates.
        self.records_graph = torch.is_grad_enabled()

    def steps(self, tensor: Tensor) -> tuple[Tensor, ...]:
        """Per-step views of a [N, ...] tensor."""
        return tensor.split(self.batch_sizes)

    def previous(self, states: Tensor) -> list[Tensor]:
        """Per-step views of the state each step starts from, in a [B + N, ...] state buffer."""
        blocks = states.split((self.batch, *self.batch_sizes))
        return [block if len(block) == size else block[:size] for block, size in zip(blocks, self.batch_sizes, strict=False)]

    def gather_previous(self, states: Tensor) -> Tensor:
        """[N, ...]: the state every row started from, from a [B + N, ...] state buffer."""
        return states[: self.rows] if self.full else states.index_select(0, self._previous_index)

    def prefixes(self, tensor: Tensor) -> list[Tensor]:
        """Per-step views of the first batch_sizes[t] rows of a [B, ...] tensor."""
        return [tensor if size == self.batch else tensor[:size] for size in self.batch_sizes]

    @cached_property
    def _grid(self) -> tuple[Tensor, Tensor, Tensor]:
        """(step start rows [T], sequence lengths [B], mask of valid (step, sequence) pairs [T, B])."""
        sizes = torch.tensor(self.batch_sizes, device=self.device)
        valid = sizes.unsqueeze(1) > torch.arange(self.batch, device=self.device)
        return sizes.cumsum(0) - sizes, valid.sum(0), valid

    @cached_property
    def sequence_index(self) -> Tensor:
        """[N]: the sequence (0..B-1, longest first) each row belongs to."""
        _, _, valid = self._grid
        return valid.nonzero()[:, 1]

    @cached_property
    def _previous_index(self) -> Tensor:
        starts, _, valid = self._grid
        block_starts = torch.cat([starts.new_zeros(1), starts[:-1] + self.batch])
        return (block_starts.unsqueeze(1) + torch.arange(self.batch, device=self.device))[valid]

    @cached_property
    def last_index(self) -> Tensor:
        """[B]: the row of each sequence's last step."""
        starts, lengths, _ = self._grid
        return starts[lengths - 1] + torch.arange(self.batch, device=self.device)

    @cached_property
    def reverse_index(self) -> Tensor:
        """[N]: a permutation of the rows that reverses every sequence within its own length.

        The reversed data has the same layout, so the backward direction of a bidirectional
        layer is the forward scan over it. The permutation is its own inverse.
        """
        starts, lengths, valid = self._grid
        steps = torch.arange(len(self.batch_sizes), device=self.device).unsqueeze(1)
        sequences = torch.arange(self.batch, device=self.device)
        reversed_steps = (lengths - 1 - steps).clamp_min(0)
        return (starts[reversed_steps] + sequences)[valid]


def _with_initial(initial: Tensor, layout: _Layout) -> Tensor:
    """A [B + N, H] state buffer whose first B rows hold the initial state."""
    states = initial.new_empty(layout.batch + layout.rows, initial.shape[1])
    states[: layout.batch] = initial
    return states


def _carry(carried: Tensor, grad_output: Tensor) -> Tensor:
    """dL/dh_{t-1}: what flows back through step t plus the loss's own gradient at step t - 1,
    which may hold more sequences than step t (the carried rows are its first ones)."""
    if len(carried) == len(grad_output):
        return carried.add_(grad_output)
    total = grad_output.clone()
    total[: len(carried)] += carried
    return total


def _matmul(x: Tensor, weight_t: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """x @ weight_t + bias, written into `out` when given."""
    return torch.mm(x, weight_t, out=out) if bias is None else torch.addmm(bias, x, weight_t, out=out)


def _sigmoid_derivative(s: Tensor) -> Tensor:
    """s ⊙ (1 - s) for s = sigmoid(a): d s / d a."""
    return torch.addcmul(s, s, s, value=-1)


def _times_tanh_derivative(grad: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """grad ⊙ (1 - y²) for y = tanh(a): dL/da from dL/dy."""
    return torch.addcmul(grad, grad * y, y, value=-1, out=out)


class _Scan(Function):
    """What the three scans share: a custom Function over a packed sequence with two backward paths.

    Its arguments are (layout, gi_all, w_hh, b_hh, ln_weight, ln_bias, mask, *initial states, *options), the
    options being what the cell adds (the LSTM's W_hr, the RNN's nonlinearity). The hand-derived `backward`
    is the fast path. It is neither differentiable nor batchable, so when autograd needs either (a backward
    with create_graph=True runs in grad mode; gradcheck's batched check and jacobian(vectorize=True) run it
    under vmap), `_recomputed_gradients` recomputes the scan from the saved arguments with `step`, the same
    equations in differentiable torch ops, and differentiates that.
    """

    gates: ClassVar[int]  # gate blocks in W_hh's rows
    states: ClassVar[int]  # initial states: h, or (h, c)

    @staticmethod
    def step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...], *options: Any) -> tuple[Tensor, ...]:
        """One step in differentiable torch ops: the new state from the previous one and the two pre-activations."""
        raise NotImplementedError


def _save(ctx: Any, scan: type[_Scan], arguments: tuple[Any, ...], *intermediates: Tensor | None) -> None:
    """Save the intermediates the hand-derived backward reads, then the forward's arguments for `_recomputed_gradients`.

    Through save_for_backward, the arguments cost no copy (only the input pre-activations gi stay alive until the
    backward) and come back attached to their graph under create_graph=True; autograd refuses the backward if one
    was modified in place since.
    """
    ctx.scan, ctx.intermediates = scan, len(intermediates)
    ctx.non_tensors = {i: argument for i, argument in enumerate(arguments) if not isinstance(argument, Tensor | None)}
    ctx.save_for_backward(*intermediates, *(argument for i, argument in enumerate(arguments) if i not in ctx.non_tensors))


def _differentiable_scan(
    scan: type[_Scan],
    layout: _Layout,
    gi_all: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    mask: Tensor | None,
    *states_and_options: Any,
) -> tuple[Tensor, ...]:
    """The scan's outputs (every row's states, as its forward returns them) computed step by step in differentiable ops."""
    state, options = states_and_options[: scan.states], states_and_options[scan.states :]
    outputs = []
    for size, gi in zip(layout.batch_sizes, layout.steps(gi_all), strict=True):
        state = tuple(s[:size] for s in state)
        gh = _matmul(state[0] if mask is None else state[0] * mask[:size], w_hh.t(), b_hh)
        if ln_weight is not None:
            gh = _gate_norm(gh, ln_weight, ln_bias, scan.gates)
        state = scan.step(gi, gh, state, *options)
        outputs.append(state)
    return tuple(torch.cat(rows) for rows in zip(*outputs, strict=True))


def _recomputed_gradients(ctx: Any, grads: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The scan's input gradients through autograd on `_differentiable_scan`: differentiable again when the
    backward runs with create_graph=True, batched when it runs under vmap. It costs a forward and a backward
    of the step-by-step graph, as a plain PyTorch loop over the steps would."""
    saved = iter(ctx.saved_tensors[ctx.intermediates :])
    arguments = [ctx.non_tensors[i] if i in ctx.non_tensors else next(saved) for i in range(len(ctx.needs_input_grad))]
    wanted = [i for i, needed in enumerate(ctx.needs_input_grad) if needed]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        outputs = _differentiable_scan(ctx.scan, *arguments)
    found = torch.autograd.grad(outputs, [arguments[i] for i in wanted], grads, create_graph=create_graph)
    gradients: list[Tensor | None] = [None] * len(arguments)
    for i, gradient in zip(wanted, found, strict=True):
        gradients[i] = gradient
    return tuple(gradients)


def _fast_unless_differentiated(backward: Any) -> Any:
    """A scan's backward: the hand-derived one, unless autograd needs gradients it cannot give (`_Scan`)."""

    @functools.wraps(backward)
    def dispatch(ctx: Any, *grads: Tensor) -> Any:
        # One test on the fast path. The legacy vmap is the one gradcheck and is_grads_batched use.
        if torch.is_grad_enabled() or any(torch._C._functorch.is_legacy_batchedtensor(grad) for grad in grads):
            return _recomputed_gradients(ctx, grads)
        return backward(ctx, *grads)

    return dispatch


class _HiddenPath:
    """The recurrent half of every gate pre-activation, shared by the three cells:

        gh_t = W_hh (m ⊙ h_{t-1}) + b_hh,  then optionally layer-normalised per gate: gain ⊙ LN(gh_t) + bias

    with m the recurrent-dropout mask (one per sequence, the same at every step). It gives
    the cell gh_t, returns gh_t's share of dL/dh_{t-1} in the backward loop, and the parameter
    gradients as one matmul over all steps after the loop.
    """

    def __init__(
        self,
        layout: _Layout,
        gates: int,
        w_hh: Tensor,
        b_hh: Tensor | None,
        ln_weight: Tensor | None,
        ln_bias: Tensor | None,
        mask: Tensor | None,
    ) -> None:
        self.layout, self.w_hh, self.b_hh, self.mask = layout, w_hh, b_hh, mask
        self.w_hh_t = w_hh.t()
        self.gates, self.size = gates, w_hh.shape[0] // gates  # h_{t-1} is narrower than the gates with a projection
        self.masks = layout.prefixes(mask) if mask is not None else None
        self.norm = (ln_weight.view(self.gates, self.size), ln_bias.view(self.gates, self.size)) if ln_weight is not None else None
        self.norm_inputs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # per step: (W_hh m⊙h + b_hh, LN of it, mean, 1/std)

    def forward_step(self, step: int, h: Tensor, out: Tensor) -> Tensor:
        """Write gh_t into `out` and return it."""
        if self.masks is not None:
            h = h * self.masks[step]
        if self.norm is None:
            return _matmul(h, self.w_hh_t, self.b_hh, out=out)
        raw = _matmul(h, self.w_hh_t, self.b_hh).view(len(h), self.gates, self.size)
        normalised, mean, rstd = torch.native_layer_norm(raw, [self.size], None, None, LAYER_NORM_EPS)
        self.norm_inputs.append((raw, normalised, mean, rstd))
        torch.addcmul(self.norm[1], normalised, self.norm[0], out=out.view_as(raw))
        return out

    def start_backward(self) -> None:
        if self.norm is not None:
            self.grad_raw_all = self.w_hh.new_empty(self.layout.rows, self.gates * self.size)
            self.grad_raw = self.layout.steps(self.grad_raw_all)
            self.grad_ln_weight = self.w_hh.new_zeros(self.gates, self.size)

    def backward_step(self, step: int, grad_gh: Tensor) -> Tensor:
        """(d gh_t / d h_{t-1})^T dL/dgh_t, a new tensor shaped like h_{t-1}."""
        if self.norm is not None:
            raw, normalised, mean, rstd = self.norm_inputs[step]
            grad_normalised = grad_gh.view_as(raw)
            self.grad_ln_weight += (grad_normalised * normalised).sum(0)
            grad_raw, _, _ = torch.ops.aten.native_layer_norm_backward(
                grad_normalised * self.norm[0], raw, [self.size], mean, rstd, None, None, [True, False, False]
            )
            grad_gh = self.grad_raw[step].copy_(grad_raw.view(len(raw), -1))
        grad_h = grad_gh.mm(self.w_hh)
        return grad_h if self.masks is None else grad_h.mul_(self.masks[step])

    def parameter_grads(self, h_previous: Tensor, grad_gh: Tensor) -> tuple[Tensor | None, ...]:
        """Gradients of (w_hh, b_hh, ln_weight, ln_bias) given every row's h_{t-1} and dL/dgh."""
        grad_ln_weight = grad_ln_bias = None
        if self.norm is not None:
            grad_ln_weight, grad_ln_bias = self.grad_ln_weight.flatten(), grad_gh.sum(0)
            grad_gh = self.grad_raw_all
        if self.mask is not None:
            h_previous = h_previous * self.mask.index_select(0, self.layout.sequence_index)
        grad_b_hh = grad_gh.sum(0) if self.b_hh is not None else None
        return grad_gh.t().mm(h_previous), grad_b_hh, grad_ln_weight, grad_ln_bias


def _intermediates(ctx: Any) -> list[Tensor | None]:
    """A scan's saved intermediates (`_save`), contiguous: the C++ loops read rows of contiguous buffers, and a
    saved-tensor hook may unpack another layout (a no-op otherwise)."""
    return [None if saved is None else saved.contiguous() for saved in ctx.saved_tensors[: ctx.intermediates]]


def _kernels(hidden: _HiddenPath, like: Tensor, projection: Tensor | None = None) -> Any:
    """The C++ loops (rnnlab.models.fused) where they compute what the Python loops below do, else None: float and double
    on the CPU, without layer norm, recurrent dropout or the LSTM's projection, which only the Python loops have. Only
    plain tensors: the C++ reads their memory, which fake tensors (torch.export, torch.compile) and wrapper subclasses
    (DTensor) do not have. A scan's forward decides, its backward follows (ctx.kernels)."""
    if hidden.norm is not None or hidden.mask is not None or projection is not None or torch.compiler.is_compiling():
        return None
    if any(type(tensor) not in (Tensor, nn.Parameter) for tensor in (like, hidden.w_hh, hidden.b_hh) if tensor is not None):
        return None
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return None
    return fused.kernels()


class _GRUScan(_Scan):
    """The GRU over a packed sequence, given the input pre-activations gi = W_ih x_t + b_ih of all steps.

    PyTorch's equations (gate order r, z, n; the reset gate multiplies the hidden matmul's
    output rather than its input as in Cho et al. 2014, so one matmul per step serves all gates):

        gh  = W_hh h_{t-1} + b_hh
        r   = sigmoid(gi_r + gh_r)                  reset gate
        z   = sigmoid(gi_z + gh_z)                  update gate
        n   = tanh(gi_n + r ⊙ gh_n)                 candidate state
        h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}  =  n + z ⊙ (h_{t-1} - n)

    The other convention in circulation, h_t = z ⊙ n + (1 - z) ⊙ h_{t-1} (Cho et al., Keras'
    documentation, many textbooks), is the same model with z relabelled: its z is this 1 - z,
    and as 1 - sigmoid(a) = sigmoid(-a), negating the z rows of W_ih, W_hh, b_ih and b_hh turns
    one into the other. The two describe the same functions; only the weights that express them differ.
    """

    gates, states = 3, 1

    @staticmethod
    def step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...], *options: Any) -> tuple[Tensor, ...]:
        (h,) = state
        (gi_rz, gi_n), (gh_rz, gh_n) = (pre_activations.split(2 * h.shape[1], dim=1) for pre_activations in (gi, gh))
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=1)
        n = torch.tanh(gi_n + r * gh_n)
        return (n + z * (h - n),)

    @staticmethod
    def forward(ctx: Any, layout: _Layout, gi_all: Tensor, *hidden_and_h0: Tensor | None) -> Tensor:
        *hidden_args, h0 = hidden_and_h0
        hidden, size, steps = _HiddenPath(layout, _GRUScan.gates, *hidden_args), h0.shape[1], layout.steps
        states = _with_initial(h0, layout)
        # Intermediates: every step's for the backward pass, else one step's, reused.
        keep = layout.records_graph and any(ctx.needs_input_grad)
        rows, per_step = (layout.rows, steps) if keep else (layout.batch, layout.prefixes)
        gh_all, n_all = gi_all.new_empty(rows, 3 * size), gi_all.new_empty(rows, size)  # gh's r and z columns end up holding r and z
        if (kernels := _kernels(hidden, gi_all)) is not None:
            kernels.gru_forward(gi_all, hidden.w_hh, hidden.b_hh, states, gh_all, n_all, layout.batch_sizes, keep)
        else:
            h_previous, h = layout.previous(states), steps(states[layout.batch :])
            gh, n, (gh_rz, gh_n) = per_step(gh_all), per_step(n_all), map(per_step, gh_all.split([2 * size, size], dim=1))
            r, z = map(per_step, gh_all[:, : 2 * size].split(size, dim=1))
            gi_rz, gi_n = map(steps, gi_all.split([2 * size, size], dim=1))
            for t in range(len(layout.batch_sizes)):
                hidden.forward_step(t, h_previous[t], out=gh[t])
                gh_rz[t].add_(gi_rz[t]).sigmoid_()
                torch.addcmul(gi_n[t], r[t], gh_n[t], out=n[t]).tanh_()
                torch.lerp(n[t], h_previous[t], z[t], out=h[t])
        ctx.layout, ctx.hidden, ctx.kernels = layout, hidden, kernels
        _save(ctx, _GRUScan, (layout, gi_all, *hidden_and_h0), states, gh_all, n_all)
        return states[layout.batch :]

    @staticmethod
    @_fast_unless_differentiated
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        layout, hidden, steps = ctx.layout, ctx.hidden, ctx.layout.steps
        states, gh_all, n_all = _intermediates(ctx)
        size = n_all.shape[1]
        # dL/d(gi_r + gh_r), dL/d(gi_z + gh_z), dL/dgh_n, then dL/d(gi_n + r ⊙ gh_n) for every row; dL/dh_0.
        if (kernels := ctx.kernels) is not None:
            grad_gh_all, grad_a_n_all, grad_h = kernels.gru_backward(grad_output, states, gh_all, n_all, hidden.w_hh, layout.batch_sizes)
        else:
            h_previous, grad_output, n = layout.previous(states), steps(grad_output), steps(n_all)
            r, z, gh_n = map(steps, gh_all.split(size, dim=1))
            grad_gh_all, grad_a_n_all = torch.empty_like(gh_all), torch.empty_like(n_all)
            grad_gh, grad_a_n = steps(grad_gh_all), steps(grad_a_n_all)
            grad_a_r, grad_a_z, grad_gh_n = map(steps, grad_gh_all.split(size, dim=1))
            hidden.start_backward()
            grad_h = grad_output[-1]  # dL/dh_t, complete once the later steps are done
            for t in reversed(range(len(layout.batch_sizes))):
                grad_n = torch.addcmul(grad_h, grad_h, z[t], value=-1)  # dh_t/dn = 1 - z
                _times_tanh_derivative(grad_n, n[t], out=grad_a_n[t])
                torch.mul(grad_a_n[t], r[t], out=grad_gh_n[t])
                torch.mul(grad_a_n[t], gh_n[t], out=grad_a_r[t]).mul_(_sigmoid_derivative(r[t]))  # dn/dr = (1 - n²) ⊙ gh_n
                torch.mul((h_previous[t] - n[t]).mul_(grad_h), _sigmoid_derivative(z[t]), out=grad_a_z[t])  # dh_t/dz = h_{t-1} - n
                carried = hidden.backward_step(t, grad_gh[t]).addcmul_(z[t], grad_h)  # dh_t/dh_{t-1}: through gh, and z directly
                grad_h = _carry(carried, grad_output[t - 1]) if t else carried
        parameter_grads = hidden.parameter_grads(layout.gather_previous(states), grad_gh_all)
        grad_gh_all[:, 2 * size :] = grad_a_n_all  # now dL/dgi: gi_n enters n without the reset gate's factor
        return None, grad_gh_all, *parameter_grads, None, grad_h


class _LSTMScan(_Scan):
    """The LSTM over a packed sequence, given gi = W_ih x_t + b_ih of all steps. PyTorch's
    equations (gate order i, f, g, o), with W_hr only for an LSTM with projections (proj_size > 0):

        a = gi + W_hh h_{t-1} + b_hh
        i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)     input, forget, cell, output gates
        c_t = f ⊙ c_{t-1} + i ⊙ g
        h_t = o ⊙ tanh(c_t),  or  W_hr (o ⊙ tanh(c_t))  with projections

    With projections h is proj_size wide (W_hr is [proj_size, H], W_hh [4H, proj_size]) and c stays H wide.
    """

    gates, states = 4, 2

    @staticmethod
    def step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...], *options: Any) -> tuple[Tensor, ...]:
        (_, c), (w_hr,) = state, options
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        c_t = torch.sigmoid(i) * torch.tanh(g) + torch.sigmoid(f) * c
        unprojected = torch.sigmoid(o) * torch.tanh(c_t)
        return (unprojected if w_hr is None else unprojected.mm(w_hr.t())), c_t

    @staticmethod
    def forward(ctx: Any, layout: _Layout, gi_all: Tensor, *hidden_states_and_projection: Tensor | None) -> tuple[Tensor, Tensor]:
        *hidden_args, h0, c0, w_hr = hidden_states_and_projection
        hidden, size, steps = _HiddenPath(layout, _LSTMScan.gates, *hidden_args), c0.shape[1], layout.steps
        h_states, c_states = _with_initial(h0, layout), _with_initial(c0, layout)
        # Intermediates: every step's for the backward pass, else one step's, reused.
        keep = layout.records_graph and any(ctx.needs_input_grad)
        rows, per_step = (layout.rows, steps) if keep else (layout.batch, layout.prefixes)
        gates_all, tanh_c_all = gi_all.new_empty(rows, 4 * size), gi_all.new_empty(rows, size)  # gates: pre-activations, then activations
        # o ⊙ tanh(c_t): h_t itself, or what W_hr projects to h_t.
        unprojected_all, projection = (None, None) if w_hr is None else (gi_all.new_empty(rows, size), w_hr.t())
        if (kernels := _kernels(hidden, gi_all, projection)) is not None:
            kernels.lstm_forward(gi_all, hidden.w_hh, hidden.b_hh, h_states, c_states, gates_all, tanh_c_all, layout.batch_sizes, keep)
        else:
            h_previous, h = layout.previous(h_states), steps(h_states[layout.batch :])
            c_previous, c = layout.previous(c_states), steps(c_states[layout.batch :])
            gi, gates, tanh_c = steps(gi_all), per_step(gates_all), per_step(tanh_c_all)
            i_f, g, o = map(per_step, gates_all.split([2 * size, size, size], dim=1))
            i, f = map(per_step, gates_all[:, : 2 * size].split(size, dim=1))
            unprojected = h if w_hr is None else per_step(unprojected_all)
            for t in range(len(layout.batch_sizes)):
                hidden.forward_step(t, h_previous[t], out=gates[t]).add_(gi[t])
                i_f[t].sigmoid_(), g[t].tanh_(), o[t].sigmoid_()
                torch.mul(f[t], c_previous[t], out=c[t]).addcmul_(i[t], g[t])
                torch.mul(o[t], torch.tanh(c[t], out=tanh_c[t]), out=unprojected[t])
                if projection is not None:
                    torch.mm(unprojected[t], projection, out=h[t])
        ctx.layout, ctx.hidden, ctx.kernels = layout, hidden, kernels
        arguments = (layout, gi_all, *hidden_states_and_projection)
        _save(ctx, _LSTMScan, arguments, h_states, c_states, gates_all, tanh_c_all, unprojected_all, w_hr)
        return h_states[layout.batch :], c_states[layout.batch :]

    @staticmethod
    @_fast_unless_differentiated
    def backward(ctx: Any, grad_h_output: Tensor, grad_c_output: Tensor) -> tuple[Tensor | None, ...]:
        layout, hidden, steps = ctx.layout, ctx.hidden, ctx.layout.steps
        h_states, c_states, gates_all, tanh_c_all, unprojected_all, w_hr = _intermediates(ctx)
        size = tanh_c_all.shape[1]
        # dL/d(a_i, a_f, a_g, a_o) for every row; dL/dh_0 and dL/dc_0.
        if (kernels := ctx.kernels) is not None:
            grad_a_all, grad_h, grad_c = kernels.lstm_backward(
                grad_h_output, grad_c_output, c_states, gates_all, tanh_c_all, hidden.w_hh, layout.batch_sizes
            )
        else:
            i, f, g, o = map(steps, gates_all.split(size, dim=1))
            c_previous, tanh_c = layout.previous(c_states), steps(tanh_c_all)
            if w_hr is not None:  # every dL/dh_t, for W_hr's gradient
                grad_h_all = torch.empty_like(grad_h_output)
                grad_h_steps = steps(grad_h_all)
            grad_h_output, grad_c_output = steps(grad_h_output), steps(grad_c_output)
            grad_a_all = torch.empty_like(gates_all)
            grad_a = steps(grad_a_all)
            grad_a_i, grad_a_f, grad_a_g, grad_a_o = map(steps, grad_a_all.split(size, dim=1))
            hidden.start_backward()
            grad_h, grad_c = grad_h_output[-1], grad_c_output[-1]  # dL/dh_t, and dL/dc_t through c_{t+1}
            for t in reversed(range(len(layout.batch_sizes))):
                if w_hr is not None:  # from dL/dh_t to dL/d(o ⊙ tanh c_t), which the lines below call grad_h
                    grad_h = grad_h_steps[t].copy_(grad_h).mm(w_hr)
                grad_c = _times_tanh_derivative(grad_h * o[t], tanh_c[t]).add_(grad_c)  # dL/dc_t: through h_t and c_{t+1}
                torch.mul(grad_h * tanh_c[t], _sigmoid_derivative(o[t]), out=grad_a_o[t])
                torch.mul(grad_c * g[t], _sigmoid_derivative(i[t]), out=grad_a_i[t])
                torch.mul(grad_c * c_previous[t], _sigmoid_derivative(f[t]), out=grad_a_f[t])
                _times_tanh_derivative(grad_c * i[t], g[t], out=grad_a_g[t])
                carried_h, carried_c = hidden.backward_step(t, grad_a[t]), grad_c.mul_(f[t])
                grad_h = _carry(carried_h, grad_h_output[t - 1]) if t else carried_h
                grad_c = _carry(carried_c, grad_c_output[t - 1]) if t else carried_c
        parameter_grads = hidden.parameter_grads(layout.gather_previous(h_states), grad_a_all)
        grad_w_hr = grad_h_all.t().mm(unprojected_all) if w_hr is not None else None
        return None, grad_a_all, *parameter_grads, None, grad_h, grad_c, grad_w_hr


class _RNNScan(_Scan):
    """The plain (Elman) RNN over a packed sequence, given gi = W_ih x_t + b_ih of all steps:

    h_t = tanh(gi + W_hh h_{t-1} + b_hh)        (or relu)
    """

    gates, states = 1, 1

    @staticmethod
    def step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...], *options: Any) -> tuple[Tensor, ...]:
        (nonlinearity,) = options
        return ((torch.tanh if nonlinearity == "tanh" else torch.relu)(gi + gh),)

    @staticmethod
    def forward(ctx: Any, layout: _Layout, gi_all: Tensor, *hidden_h0_and_nonlinearity: Any) -> Tensor:
        *hidden_args, h0, nonlinearity = hidden_h0_and_nonlinearity
        hidden = _HiddenPath(layout, _RNNScan.gates, *hidden_args)
        states = _with_initial(h0, layout)
        if (kernels := _kernels(hidden, gi_all)) is not None:
            kernels.rnn_forward(gi_all, hidden.w_hh, hidden.b_hh, states, layout.batch_sizes, nonlinearity == "tanh")
        else:
            h_previous, h, gi = layout.previous(states), layout.steps(states[layout.batch :]), layout.steps(gi_all)
            activate = Tensor.tanh_ if nonlinearity == "tanh" else Tensor.relu_
            for t in range(len(layout.batch_sizes)):
                activate(hidden.forward_step(t, h_previous[t], out=h[t]).add_(gi[t]))
        ctx.layout, ctx.hidden, ctx.nonlinearity, ctx.kernels = layout, hidden, nonlinearity, kernels
        _save(ctx, _RNNScan, (layout, gi_all, *hidden_h0_and_nonlinearity), states)
        return states[layout.batch :]

    @staticmethod
    @_fast_unless_differentiated
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        layout, hidden = ctx.layout, ctx.hidden
        (states,) = _intermediates(ctx)
        # dL/d(gi + gh) for every row; dL/dh_0.
        if (kernels := ctx.kernels) is not None:
            grad_a_all, grad_h = kernels.rnn_backward(grad_output, states, hidden.w_hh, layout.batch_sizes, ctx.nonlinearity == "tanh")
        else:
            h, grad_output = layout.steps(states[layout.batch :]), layout.steps(grad_output)
            grad_a_all = torch.empty_like(states[layout.batch :])
            grad_a = layout.steps(grad_a_all)
            hidden.start_backward()
            grad_h = grad_output[-1]
            for t in reversed(range(len(layout.batch_sizes))):
                if ctx.nonlinearity == "tanh":
                    _times_tanh_derivative(grad_h, h[t], out=grad_a[t])
                else:
                    torch.mul(grad_h, h[t] > 0, out=grad_a[t])
                carried = hidden.backward_step(t, grad_a[t])
                grad_h = _carry(carried, grad_output[t - 1]) if t else carried
        parameter_grads = hidden.parameter_grads(layout.gather_previous(states), grad_a_all)
        return None, grad_a_all, *parameter_grads, None, grad_h, None


def _gate_norm(pre_activations: Tensor, weight: Tensor, bias: Tensor, gates: int) -> Tensor:
    """Layer-normalise each gate's block of [N, gates * H] pre-activations, with a gain and bias per unit."""
    rows, width = pre_activations.shape
    normalised = F.layer_norm(pre_activations.view(rows, gates, width // gates), [width // gates], eps=LAYER_NORM_EPS)
    return torch.addcmul(bias.view(gates, -1), normalised, weight.view(gates, -1)).view(rows, width)


class _RecurrentBase(nn.Module):
    """What the three cells share: torch's parameter layout, inputs and states, layers and directions."""

    scan: ClassVar[type[_Scan]]
    mode: str  # torch.nn.RNNBase's name for the cell, which code written for torch reads

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recurrent_dropout: float = 0.0,
        layer_norm: bool = False,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        cell = type(self).__name__
        # torch.nn.RNNBase's checks, with its exception classes.
        for option, value in {"bias": bias, "batch_first": batch_first, "layer_norm": layer_norm}.items():
            if not isinstance(value, bool):
                raise CellTypeError(f"{cell}: {option} should be of type bool, got: {type(value).__name__}; write {option}=True or False.")
        for option, value in {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers}.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise CellTypeError(f"{cell}: {option} should be of type int, got: {type(value).__name__} ({value!r}).")
            if value <= 0:
                raise CellValueError(f"{cell}: {option} must be greater than zero, got {value}.")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool):
            raise CellTypeError(f"{cell}: proj_size should be of type int, got: {type(proj_size).__name__} ({proj_size!r}).")
        if proj_size < 0:
            raise CellValueError(f"{cell}: proj_size should be a positive integer or zero to disable projections, got {proj_size}.")
        if proj_size >= hidden_size:
            raise CellValueError(
                f"{cell}: proj_size has to be smaller than hidden_size ({hidden_size}), got {proj_size}; 0 disables projections."
            )
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise CellValueError(
                f"{cell}: dropout should be a number in range [0, 1], the probability of zeroing an element; got {dropout!r}."
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{cell}: dropout acts between recurrent layers, so dropout={dropout} with num_layers=1 does nothing.", stacklevel=2
            )
        if not isinstance(recurrent_dropout, numbers.Number) or not 0 <= recurrent_dropout < 1:
            raise CellValueError(f"{cell}: recurrent_dropout must be in [0, 1), got {recurrent_dropout!r}.")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, float(dropout), bidirectional
        self.recurrent_dropout, self.layer_norm, self.proj_size = float(recurrent_dropout), layer_norm, proj_size
        self.num_directions = 2 if bidirectional else 1
        width = self.scan.gates * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else self._output_size * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                # torch's names and registration order, so the same seed draws the same initial weights.
                shapes = {f"weight_ih_l{layer}{suffix}": (width, layer_input), f"weight_hh_l{layer}{suffix}": (width, self._output_size)}
                if bias:
                    shapes |= {f"bias_ih_l{layer}{suffix}": (width,), f"bias_hh_l{layer}{suffix}": (width,)}
                if proj_size:
                    shapes[f"weight_hr_l{layer}{suffix}"] = (proj_size, hidden_size)
                if layer_norm:
                    shapes |= {f"ln_{kind}_{path}_l{layer}{suffix}": (width,) for path in ("ih", "hh") for kind in ("weight", "bias")}
                for name, shape in shapes.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's initialisation, U(-1/√H, 1/√H) for weights and biases; layer norm starts as the identity."""
        bound = 1 / math.sqrt(self.hidden_size)
        for name, parameter in self.named_parameters():
            if name.startswith("ln_weight"):
                nn.init.ones_(parameter)
            elif name.startswith("ln_bias"):
                nn.init.zeros_(parameter)
            else:
                nn.init.uniform_(parameter, -bound, bound)

    @property
    def _output_size(self) -> int:
        """The width of h (and of each direction's output): proj_size with projections, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _state_sizes(self) -> tuple[int, ...]:
        """The width of each state the cell carries."""
        return (self._output_size,)

    def flatten_parameters(self) -> None:
        """A no-op kept for drop-in compatibility: the weights are used where they are."""

    def _suffixes(self) -> list[str]:
        """_l{layer}[_reverse] of every layer and direction, in torch's order."""
        return [f"_l{layer}{reverse}" for layer in range(self.num_layers) for reverse in ("", "_reverse")[: self.num_directions]]

    @property
    def _all_weights(self) -> list[list[str]]:
        """Parameter names per layer and direction, as torch.nn.RNNBase lists them (code written for torch reads these)."""
        names = [name for name, _ in self.named_parameters()]  # registered in torch's order
        return [[name for name in names if name.endswith(suffix)] for suffix in self._suffixes()]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {"proj_size": 0, "num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0, "bidirectional": False}
        defaults |= {"recurrent_dropout": 0.0, "layer_norm": False}
        return text + "".join(f", {name}={getattr(self, name)}" for name, default in defaults.items() if getattr(self, name) != default)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, Any]:
        """Run over `input` ([T, B, I], [B, T, I] with batch_first, [T, I] unbatched, or a PackedSequence).

        With `lengths`, sequence b of a padded batch is its first lengths[b] steps: the output
        is zero past them and h_n is taken at each sequence's last step, as torch gives for
        pack_padded_sequence -> cell -> pad_packed_sequence.
        """
        if torch.jit.is_tracing():
            raise CellInputError(
                f"torch.jit.trace cannot record rnnlab's {type(self).__name__}: its loop runs inside a custom autograd "
                f"Function that tracing does not follow. Trace a model built with torch.nn.{type(self).__name__} instead "
                "(the state_dict loads into it unchanged)."
            )
        device_type = (input.data if isinstance(input, PackedSequence) else input).device.type
        if torch.is_autocast_enabled(device_type):
            # The hand-derived backward assumes one dtype throughout: run at the weights' precision, as autocast runs
            # the ops it keeps in float32.
            dtype = self.weight_ih_l0.dtype
            with torch.autocast(device_type, enabled=False):
                return self.forward(input.to(dtype), self._map_state(hx, lambda state: state.to(dtype)), lengths)
        if lengths is not None:
            if isinstance(input, PackedSequence):
                raise CellInputValueError("Pass either a PackedSequence or a padded batch with lengths, not both.")
            self._check_features(input, batched_only=True)
            lengths = self._check_lengths(input, torch.as_tensor(lengths).cpu())
            packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first, enforce_sorted=False)
            output, state = self._run_packed(packed, hx)
            total = input.shape[1 if self.batch_first else 0]
            return pad_packed_sequence(output, batch_first=self.batch_first, total_length=total)[0], state
        if isinstance(input, PackedSequence):
            return self._run_packed(input, hx)
        self._check_features(input)
        unbatched = input.dim() == 2
        steps = input.unsqueeze(1) if unbatched else input.transpose(0, 1) if self.batch_first else input
        length, batch = steps.shape[:2]
        if unbatched:
            hx = self._map_state(hx, lambda s: s.unsqueeze(1))
        if batch == 0:  # torch gives empty outputs and states for an empty batch
            initial = self._initial_states(hx, 0, input)
            output = input.new_zeros(length, 0, self.num_directions * self._output_size)
            return (output.transpose(0, 1) if self.batch_first else output), self._pack_state(initial)
        layout = _Layout((batch,) * length, input.device)
        data, state = self._run(steps.reshape(length * batch, -1), layout, hx)
        output = data.view(length, batch, -1)
        if unbatched:
            return output.squeeze(1), self._map_state(state, lambda s: s.squeeze(1))
        return (output.transpose(0, 1) if self.batch_first else output), state

    def _run_packed(self, packed: PackedSequence, hx: Any) -> tuple[PackedSequence, Any]:
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.shape[-1] != self.input_size:
            raise CellInputError(
                f"{type(self).__name__} expects {self.input_size} input features, got packed data of shape {tuple(data.shape)}."
            )
        layout = _Layout(batch_sizes.tolist(), data.device)
        if sorted_indices is not None:
            if hx is not None:
                self._initial_states(hx, layout.batch, data)  # name a bad state here, not as a failed index_select
            hx = self._map_state(hx, lambda s: s.index_select(1, sorted_indices))
        output, state = self._run(data, layout, hx)
        if unsorted_indices is not None:
            state = self._map_state(state, lambda s: s.index_select(1, unsorted_indices))
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), state

    def _run(self, data: Tensor, layout: _Layout, hx: Any) -> tuple[Tensor, Any]:
        """All layers and directions over packed data [N, I]; returns the last layer's output and the final states."""
        initial = self._initial_states(hx, layout.batch, data)
        finals = []
        suffixes = iter(self._suffixes())
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                suffix = next(suffixes)
                w_ih, b_ih, w_hh, b_hh, ln_w_ih, ln_b_ih, ln_w_hh, ln_b_hh = (getattr(self, name + suffix, None) for name in PARAMETERS)
                inputs = data if direction == 0 else data.index_select(0, layout.reverse_index)
                gi = _matmul(inputs, w_ih.t(), b_ih)
                if self.layer_norm:
                    gi = _gate_norm(gi, ln_w_ih, ln_b_ih, self.scan.gates)
                hidden = (w_hh, b_hh, ln_w_hh, ln_b_hh, self._recurrent_mask(layout, data))
                index = layer * self.num_directions + direction
                arguments = (*hidden, *(state[index] for state in initial), *self._scan_options(suffix))
                sequences = self.scan.apply(layout, gi, *arguments)
                sequences = sequences if isinstance(sequences, tuple) else (sequences,)
                finals.append([sequence.index_select(0, layout.last_index) for sequence in sequences])
                outputs.append(sequences[0] if direction == 0 else sequences[0].index_select(0, layout.reverse_index))
            data = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                data = F.dropout(data, self.dropout, training=True)
        states = tuple(torch.stack(state) for state in zip(*finals, strict=True))
        return data, self._pack_state(states)

    def _scan_options(self, suffix: str) -> tuple[Any, ...]:
        """The scan's arguments after the initial states, for the layer and direction of `suffix`."""
        return ()

    def _recurrent_mask(self, layout: _Layout, like: Tensor) -> Tensor | None:
        """Variational dropout: one mask per sequence, reused at every step."""
        if not (self.training and self.recurrent_dropout):
            return None
        keep = 1 - self.recurrent_dropout
        return like.new_empty(layout.batch, self._output_size).bernoulli_(keep).div_(keep)

    def _check_lengths(self, input: Tensor, lengths: Tensor) -> Tensor:
        """One length per sequence, each in [1, T]: pack_padded_sequence would fail obscurely or read past the padding."""
        batch, steps = (input.shape[0], input.shape[1]) if self.batch_first else (input.shape[1], input.shape[0])
        if lengths.dim() != 1 or len(lengths) != batch:
            raise CellInputError(f"{type(self).__name__} needs one length per sequence ({batch}), got lengths {lengths.tolist()}.")
        bad = lengths[(lengths < 1) | (lengths > steps)]
        if len(bad):
            raise CellInputError(f"{type(self).__name__}: every length must be in [1, {steps}] (the padded steps), got {bad.tolist()}.")
        return lengths

    def _check_features(self, input: Tensor, batched_only: bool = False) -> None:
        cell = type(self).__name__
        layout = "[B, T, I]" if self.batch_first else "[T, B, I]"
        if input.dim() not in ((3,) if batched_only else (2, 3)):
            expected = layout if batched_only else f"{layout} or unbatched [T, I]"
            raise CellInputValueError(
                f"{cell}: expected input {expected} with I = {self.input_size}, got a {input.dim()}-D tensor {tuple(input.shape)}."
            )
        if input.shape[-1] != self.input_size:
            raise CellInputError(f"{cell}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.shape[-1]}.")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise CellValueError(
                f"{cell}: input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}); "
                f"convert the input with input.to({weight.dtype}) or the model with model.to({input.dtype})."
            )
        if input.shape[1 if self.batch_first and input.dim() == 3 else 0] == 0:
            raise CellInputError(f"{cell}: expected sequence length to be larger than 0, got input of shape {tuple(input.shape)}.")

    def _initial_states(self, hx: Any, batch: int, like: Tensor) -> tuple[Tensor, ...]:
        shapes = [(self.num_layers * self.num_directions, batch, size) for size in self._state_sizes()]
        if hx is None:
            return tuple(like.new_zeros(shape) for shape in shapes)
        states = self._unpack_state(hx)
        for name, state, shape in zip(("h_0", "c_0"), states, shapes, strict=False):
            if tuple(state.shape) != shape:
                raise CellInputError(f"{type(self).__name__} expects {name} of shape {shape}, got {tuple(state.shape)}.")
            if state.dtype != like.dtype or state.device != like.device:
                raise CellInputError(
                    f"{type(self).__name__}: the initial state is {state.dtype} on {state.device} but the input is "
                    f"{like.dtype} on {like.device}; convert it with h_0.to(input)."
                )
        return states

    def _unpack_state(self, state: Any) -> tuple[Tensor, ...]:
        return (state,)

    def _pack_state(self, states: tuple[Tensor, ...]) -> Any:
        return states[0]

    def _map_state(self, state: Any, fn: Any) -> Any:
        return None if state is None else self._pack_state(tuple(fn(s) for s in self._unpack_state(state)))


class GRU(_RecurrentBase):
    """Gated recurrent unit, the same function as torch.nn.GRU (equations and conventions: `_GRUScan`).

    Arguments as torch.nn.GRU, plus `recurrent_dropout` and `layer_norm` (module docstring);
    `gru(input, h_0=None, lengths=None)` returns `(output, h_n)`.
    """

    scan = _GRUScan
    mode = "GRU"


class LSTM(_RecurrentBase):
    """Long short-term memory, the same function as torch.nn.LSTM (equations: `_LSTMScan`).

    torch's arguments in torch's order, projections included: with `proj_size` > 0, h_t = W_hr (o ⊙ tanh(c_t)),
    so h_0, h_n and each direction's output are proj_size wide, c_0 and c_n hidden_size wide.
    `lstm(input, (h_0, c_0)=None, lengths=None)` returns `(output, (h_n, c_n))`.
    """

    scan = _LSTMScan
    mode = "LSTM"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recurrent_dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype,
            recurrent_dropout=recurrent_dropout, layer_norm=layer_norm, proj_size=proj_size,
        )  # fmt: skip

    def _state_sizes(self) -> tuple[int, ...]:
        return self._output_size, self.hidden_size

    def _scan_options(self, suffix: str) -> tuple[Any, ...]:
        return (getattr(self, f"weight_hr{suffix}", None),)

    def _unpack_state(self, state: Any) -> tuple[Tensor, ...]:
        if not (isinstance(state, tuple | list) and len(state) == 2):
            raise CellInputError(f"LSTM expects its initial state as a tuple (h_0, c_0), got {type(state).__name__}.")
        return tuple(state)

    def _pack_state(self, states: tuple[Tensor, ...]) -> Any:
        return states


class RNN(_RecurrentBase):
    """Elman RNN, the same function as torch.nn.RNN (equations: `_RNNScan`), tanh or relu."""

    scan = _RNNScan

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recurrent_dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        # torch.nn.RNN's order: nonlinearity is the fourth positional argument, before bias.
        if nonlinearity not in ("tanh", "relu"):
            raise CellValueError(f"RNN: unknown nonlinearity {nonlinearity!r}; select from 'tanh' or 'relu'.")
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype,
            recurrent_dropout=recurrent_dropout, layer_norm=layer_norm,
        )  # fmt: skip
        self.nonlinearity = nonlinearity
        self.mode = f"RNN_{nonlinearity.upper()}"

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", nonlinearity={self.nonlinearity}" if self.nonlinearity != "tanh" else "")

    def _scan_options(self, suffix: str) -> tuple[Any, ...]:
        return (self.nonlinearity,)
