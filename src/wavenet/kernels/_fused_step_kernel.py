"""Device code of `wavenet.kernels.fused_step`: Triton only. Read that module first for what it computes.

A module of its own because Triton picks compiled or interpreted per `@triton.jit` function when it is
decorated, from TRITON_INTERPRET: `fused_step` imports this file as is for CUDA tensors, and, for CPU
tensors (tests), once more under another name with the variable set for that import alone, so both
variants live in one process and no other Triton code in it (torch.compile's) is switched to the
interpreter. Hence also no `triton.language` function that is itself `@triton.jit` code (tl.zeros, tl.max,
tl.argmax, ...): those are compiled or interpreted as triton.language was imported, so the kernel uses
builtins (tl.full, tl.reduce) and helpers of its own, which are decorated with it.

One program per block of BLOCK_B streams runs `steps` whole steps; programs never synchronise (streams
are independent). A step's working set stays in registers: the residual input h (BLOCK_B, R_P), the
skip sum (BLOCK_B, S_P) and the logits (BLOCK_B, Q_P) at full width; the gated activation is produced
BLOCK_D channels at a time (the N tile of the filter/gate matmul) and consumed at once as the K tile of
the residual and skip matmuls, and the head's hidden layer BLOCK_S channels at a time the same way. So
nothing goes through memory but the weights (streamed from L2 every step: the cost), the rings, and the
outputs. Channel counts are padded to powers of two >= 16 (tl.arange, tl.dot); padded weights are zero.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # No tanh in triton.language that the interpreter also runs (libdevice's is GPU-only). exp(-2|x|) <= 1
    # never overflows; the absolute error near 0 is that of 1 - e, about 1e-7, like fp32 rounding of x.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _argmax_combine_fallback(value1, index1, value2, index2):
    # As tl.argmax's with tie_break_left: the larger value; of equal ones, the lower index.
    index = tl.where(value1 > value2, index1, tl.where(value1 == value2, tl.minimum(index1, index2), index2))
    return tl.maximum(value1, value2), index


# tl.argmax's own combine function where triton has it (a private name, hence the fallback): the interpreter
# recognises it and reduces with numpy.argmax instead of one Python call per element.
_argmax_combine = getattr(tl.standard, "_argmax_combine_tie_break_left", _argmax_combine_fallback)


# Triton compiles a variant per value class (== 1, multiple of 16) of integer arguments: not for these, which
# change from call to call (generate's chunks end at different phases and lengths).
@triton.jit(do_not_specialize=["batch", "steps", "phase0"])
def fused_steps_kernel(
    # The stepper's state.
    rings_ptr,  # (B, columns, R): layer inputs minus offsets, read and written in place
    ring_row_stride,  # columns * R
    tap_columns_ptr,  # (period, L (K-1)) int32: per phase, the ring columns of every past tap
    write_columns_ptr,  # (period, L) int32: per phase, the ring column of every layer's input
    embedding_ptr,  # (Q, R)
    # Weights, padded (see FusedWeights).
    filter_gate_ptr,  # (L, K, R_P, 2 D_P): past taps then the current one; filter | gate columns
    filter_gate_bias_ptr,  # (L, 2 D_P) fp32
    residual_ptr,  # (L D_P, R_P); the last layer's block is zeros
    skip_ptr,  # (L D_P, S_P): layer l's gated channel j in row l D_P + j
    skip_bias_ptr,  # (S_P,) fp32
    head_ptr,  # (S_P, S_P)
    head_bias_ptr,  # (S_P,) fp32
    output_ptr,  # (S_P, Q_P)
    output_bias_ptr,  # (Q_P,) fp32
    # Inputs and outputs.
    classes_ptr,  # (B,) int64: the input of step 0
    forced_ptr,  # (steps, B) int64: every step's input, when FORCED
    noise_ptr,  # (steps, B, Q) fp32, when HAS_NOISE
    out_ptr,  # (steps, B) int64: argmax(logits + noise)
    logits_ptr,  # (steps, B, Q) fp32, when STORE_LOGITS
    phase_ptr,  # (1,) int64: the stepper's device-side step counter, when DEVICE_PHASE
    batch,
    steps,
    phase0,  # position % period at step 0, unless DEVICE_PHASE
    period,
    LAYERS: tl.constexpr,
    KERNEL_SIZE: tl.constexpr,
    R: tl.constexpr,  # real widths where tensors are the stepper's own (rings, embedding) or outputs
    Q: tl.constexpr,
    R_P: tl.constexpr,  # padded widths
    D_P: tl.constexpr,
    S_P: tl.constexpr,
    Q_P: tl.constexpr,
    BLOCK_B: tl.constexpr,  # streams per program
    BLOCK_D: tl.constexpr,  # gated channels per tile: bounds the weight tiles in registers
    BLOCK_S: tl.constexpr,  # hidden channels of the head per tile
    DEVICE_PHASE: tl.constexpr,
    FORCED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the weights' dtype; fp32 where the interpreter cannot multiply bf16
    DOT_PRECISION: tl.constexpr,  # "ieee": fp32 stays fp32, not tf32
):
    dtype = rings_ptr.dtype.element_ty
    TAPS: tl.constexpr = LAYERS * (KERNEL_SIZE - 1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # streams
    row_ok = rows < batch
    ring_rows = rings_ptr + rows.to(tl.int64) * ring_row_stride  # B C R may pass 2^31
    r_index = tl.arange(0, R_P)
    d_index = tl.arange(0, BLOCK_D)
    s_index = tl.arange(0, S_P)
    s_tile = tl.arange(0, BLOCK_S)
    q_index = tl.arange(0, Q_P)
    # (stream, channel) masks of the stepper's tensors; no channel mask where the width needs no padding.
    if R == R_P:
        r_ok = row_ok[:, None]
    else:
        r_ok = row_ok[:, None] & (r_index < R)[None, :]
    if Q == Q_P:
        q_ok = row_ok[:, None]
    else:
        q_ok = row_ok[:, None] & (q_index < Q)[None, :]
    # Weight tile offsets are built inside the loops, from the layer and the tile, and biases are loaded where
    # they are added (L1 hits), rather than kept live in registers for the whole kernel.

    if DEVICE_PHASE:  # read on the device: no sync, and a launch captured in a CUDA graph replays right
        phase0 = tl.load(phase_ptr).to(tl.int32)
    classes = tl.load(classes_ptr + rows, mask=row_ok, other=0)
    # A while loop, not range(steps): the interpreter cannot take range() of a runtime int under numpy >= 2.4
    # (its scalars are 1-element arrays); compiled, both are one loop around everything.
    step = 0
    while step < steps:
        phase = (phase0 + step) % period
        step_rows = step.to(tl.int64) * batch + rows  # (BLOCK_B,) rows of the (steps, B, ...) tensors
        if FORCED:
            classes = tl.load(forced_ptr + step_rows, mask=row_ok, other=0)
        # Layer 0's input; rows past the batch and padded channels are zeros, and stay finite.
        h = tl.load(embedding_ptr + classes[:, None] * R + r_index[None, :], mask=r_ok, other=0.0)
        skip = tl.full((BLOCK_B, S_P), 0.0, tl.float32)

        for layer in range(LAYERS):
            tap_columns = tap_columns_ptr + phase * TAPS + layer * (KERNEL_SIZE - 1)
            h_dot = h.to(DOT_DTYPE)
            h_next = h.to(tl.float32)  # + gated @ W_res, tile by tile
            for n0 in range(0, D_P, BLOCK_D):
                # pre = bias + [past taps, h] @ W: filter and gate of the same channels side by side, so the
                # gate needs no second pass: gated = tanh(f) + tanh(f) tanh(g / 2) (g halved on the host).
                channels = layer * (2 * D_P) + n0 + d_index  # this tile's filter channels in filter_gate_bias
                acc_f = tl.full((BLOCK_B, BLOCK_D), 0.0, tl.float32)
                acc_g = tl.full((BLOCK_B, BLOCK_D), 0.0, tl.float32)
                for tap in tl.static_range(KERNEL_SIZE):
                    if tap < KERNEL_SIZE - 1:  # a past tap, from its ring column
                        column = tl.load(tap_columns + tap)
                        a = tl.load(ring_rows[:, None] + (column * R + r_index)[None, :], mask=r_ok, other=0.0)
                        a = a.to(DOT_DTYPE)
                    else:  # the current tap: h
                        a = h_dot
                    w_rows = (layer * KERNEL_SIZE + tap) * R_P + r_index  # of filter_gate as (L K R_P, 2 D_P)
                    w = filter_gate_ptr + w_rows[:, None] * (2 * D_P) + (n0 + d_index)[None, :]
                    acc_f = tl.dot(a, tl.load(w).to(DOT_DTYPE), acc_f, input_precision=DOT_PRECISION)
                    acc_g = tl.dot(a, tl.load(w + D_P).to(DOT_DTYPE), acc_g, input_precision=DOT_PRECISION)
                f = _tanh(acc_f + tl.load(filter_gate_bias_ptr + channels)[None, :])
                g = _tanh(acc_g + tl.load(filter_gate_bias_ptr + D_P + channels)[None, :])
                gated = (f + f * g).to(dtype).to(DOT_DTYPE)  # rounded where the eager step rounds it
                # This tile of gated channels is the K tile of the skip and residual matmuls.
                gated_rows = layer * D_P + n0 + d_index  # in skip's (L D_P, S_P) and residual's (L D_P, R_P)
                w_skip = tl.load(skip_ptr + gated_rows[:, None] * S_P + s_index[None, :]).to(DOT_DTYPE)
                skip = tl.dot(gated, w_skip, skip, input_precision=DOT_PRECISION)
                # The last layer's residual weights are zeros: a wasted tile, but no branch in the loop (with
                # one, the compiler kept copies of h_next for both sides: 10% more registers).
                w_res = tl.load(residual_ptr + gated_rows[:, None] * R_P + r_index[None, :]).to(DOT_DTYPE)
                h_next = tl.dot(gated, w_res, h_next, input_precision=DOT_PRECISION)
            # The layer's input of this step goes to the ring column its oldest tap was read from: only after
            # every thread of the program has read it (the barrier), as in the eager step.
            tl.debug_barrier()
            column = tl.load(write_columns_ptr + phase * LAYERS + layer)
            tl.store(ring_rows[:, None] + (column * R + r_index)[None, :], h, mask=r_ok)
            h = h_next.to(dtype)
        # Makes this step's ring writes visible to the threads that read them as taps in the next steps. With
        # two or more layers a later layer's barrier already does; one per step costs little.
        tl.debug_barrier()

        # The head, relu(relu(skip) @ W1 + b1) @ W2 + b2, in tiles of BLOCK_S hidden channels.
        skip = skip + tl.load(skip_bias_ptr + s_index)[None, :]
        skip_dot = tl.maximum(skip, 0.0).to(dtype).to(DOT_DTYPE)
        logits = tl.full((BLOCK_B, Q_P), 0.0, tl.float32)
        for n0 in range(0, S_P, BLOCK_S):
            hidden = tl.full((BLOCK_B, BLOCK_S), 0.0, tl.float32)
            w_head = tl.load(head_ptr + s_index[:, None] * S_P + (n0 + s_tile)[None, :]).to(DOT_DTYPE)
            hidden = tl.dot(skip_dot, w_head, hidden, input_precision=DOT_PRECISION)
            hidden = tl.maximum(hidden + tl.load(head_bias_ptr + n0 + s_tile)[None, :], 0.0)
            hidden = hidden.to(dtype).to(DOT_DTYPE)
            w_out = tl.load(output_ptr + (n0 + s_tile)[:, None] * Q_P + q_index[None, :]).to(DOT_DTYPE)
            logits = tl.dot(hidden, w_out, logits, input_precision=DOT_PRECISION)
        logits = (logits + tl.load(output_bias_ptr + q_index)[None, :]).to(dtype).to(tl.float32)

        # Gumbel-max: the sample is argmax(logits + noise), the first index of the maximum as torch.argmax.
        offsets = step_rows[:, None] * Q + q_index[None, :]
        if STORE_LOGITS:
            tl.store(logits_ptr + offsets, logits, mask=q_ok)
        if HAS_NOISE:
            logits = (logits + tl.load(noise_ptr + offsets, mask=q_ok, other=0.0)).to(dtype).to(tl.float32)
        logits = tl.where((q_index < Q)[None, :], logits, float("-inf"))
        indices = tl.full((BLOCK_B, Q_P), 0, tl.int32) + q_index[None, :]
        _, sample = tl.reduce((logits, indices), 1, _argmax_combine)
        sample = sample.to(tl.int64)
        tl.store(out_ptr + step_rows, sample, mask=row_ok)
        if not FORCED:
            classes = sample
        step += 1
