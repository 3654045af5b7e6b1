"""The small network of the Triton backend: pair map patches, BN statistics, the MLP backward.

Everything here works on ``N x C``-sized tensors (pools, gates, the pair-view map), never on
activations. The streaming kernels (squeeze, rescale, input gradients) live in
:mod:`cmpe_se_fused.triton.streaming` and call the ``@triton.jit`` helpers below.

Notation (SPEC): a *patch* ``q`` is the 1, 2 or 9 pair-map values under a filter at one map
position; it is held as a ``[BLOCK, JP]`` tile (``JP`` = next power of two of ``J``, zero
padded). Because BN is affine once its statistics are known, the ``e`` filters collapse into one
effective filter ``w_eff`` and bias ``b_eff`` (SPEC section 1, useful identities), in training as
well as in evaluation; training statistics follow from the patch moments:
``mu_i = w_i . E[q]``, ``var_i = w_i^T Cov[q] w_i``. Moments are per-sample centred (mean, M2)
and combined exactly (equal counts per sample), so no raw second moment ever cancels.

Per-sample moment rows (``mom[n, :]``, ``MS = 2*JP + 1 + JP*JP`` values):
``[0, JP)`` mean of q; ``[JP, 2JP)`` ``S1c = sum dv (q - mean)``; ``2JP`` ``S0 = sum dv``;
``[2JP+1, MS)`` ``M2 = sum (q - mean)(q - mean)^T`` (``dv`` terms only in the backward).

Mode numbers: 0 se, 1 double_fc, 2 pair_2x1, 3 pair_1x1, 4 folded_3x3.
"""
import triton
import triton.language as tl


@triton.jit
def _rsqrt(x, ACC: tl.constexpr):
    # IEEE-rounded sqrt in fp32 (tl.sqrt may be approximate); fp64 sqrt is always exact-rounded.
    if ACC == tl.float64:
        r = 1.0 / tl.sqrt(x)
    else:
        r = 1.0 / tl.sqrt_rn(x)
    return r


@triton.jit
def _as_acc(v, ACC: tl.constexpr):
    # v may be a compile-time constant (Triton specialises integer arguments equal to 1)
    return tl.sum(tl.zeros([1], dtype=ACC) + v, axis=0)


@triton.jit
def _split_float(hi, lo, ACC: tl.constexpr):
    # Python floats reach kernels as fp32: hosts pass (fp32(v), fp32(v - fp32(v))) so fp64 stays exact.
    return tl.sum(tl.zeros([1], dtype=ACC) + hi + lo, axis=0)


@triton.jit
def _patch(pu_row, px_row, pos, jj, mask, MODE: tl.constexpr, FOLD_M: tl.constexpr,
           FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr):
    """Patch tile ``q[pos, j]`` ([B, JP]) of one sample; pos [B, 1], jj [1, JP], mask [B, 1]."""
    if MODE == 4:
        # F[2q + f, j] = flow f of channel q*m + j; output position (orow, ocol), tap (j//3, j%3)
        frow = pos // OC + jj // 3 - PAD
        fcol = pos % OC + jj % 3 - PAD
        valid = mask & (jj < 9) & (frow >= 0) & (frow < FOLD_ROWS) & (fcol >= 0) & (fcol < FOLD_M)
        ch = (frow // 2) * FOLD_M + fcol
        is_x = (frow % 2) == 1
    elif MODE == 3:
        # pair_1x1: map C x 2 flattened row-major, position 2c + f
        ch = pos // 2 + jj * 0
        is_x = (pos % 2 + jj * 0) == 1
        valid = mask & (jj == 0)
    elif MODE == 2:
        # pair_2x1: position c, taps (u[c], x[c])
        ch = pos + jj * 0
        is_x = (jj + pos * 0) == 1
        valid = mask & (jj < 2)
    else:
        # se: z = u
        ch = pos + jj * 0
        is_x = (jj + pos * 0) < 0
        valid = mask & (jj == 0)
    qu = tl.load(pu_row + ch, mask=valid & (is_x == 0), other=0.0)
    qx = tl.load(px_row + ch, mask=valid & is_x, other=0.0)
    return qu + qx


@triton.jit
def _load_bn_stats(mean_ptr, var_or_invstd_ptr, E, eps, IS_VAR: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """``(mean, invstd)`` [BLOCK_E] (zero past E) from running stats (IS_VAR) or saved ones."""
    ei = tl.arange(0, BLOCK_E)
    em = ei < E
    mean = tl.load(mean_ptr + ei, mask=em, other=0.0).to(ACC)
    if IS_VAR:
        var = tl.load(var_or_invstd_ptr + ei, mask=em, other=1.0).to(ACC)
        invstd = tl.where(em, _rsqrt(var + eps, ACC), 0.0)
    else:
        invstd = tl.load(var_or_invstd_ptr + ei, mask=em, other=0.0).to(ACC)
    return mean, invstd


@triton.jit
def _bn_affine(pw, gamma, beta, mean, invstd, mq, E, J: tl.constexpr, JP: tl.constexpr, BLOCK_E: tl.constexpr):
    """Collapse conv + BN + filter mean into ``v = w_eff . (q - mq) + b_c`` (SPEC useful identities).

    ``mq`` [JP] is a centre for the patches (the batch mean of q where known, else 0): then
    ``b_c = mean_i(beta_i + gamma_i invstd_i (w_i . mq - mu_i))`` subtracts the two large terms
    once per filter, not once per position (the normalised map keeps eager BN's conditioning)."""
    ei = tl.arange(0, BLOCK_E)
    jj = tl.arange(0, JP)
    em = ei < E
    w = tl.load(pw + ei[:, None] * J + jj[None, :], mask=em[:, None] & (jj[None, :] < J), other=0.0)
    g = tl.load(gamma + ei, mask=em, other=0.0)
    b = tl.load(beta + ei, mask=em, other=0.0)
    scale = g * invstd
    weff = tl.sum(w * scale[:, None], axis=0) / E
    delta = tl.sum(w * mq[None, :], axis=1) - mean
    beff = tl.sum(b + scale * delta, axis=0) / E
    return weff, beff


@triton.jit
def _hidden(pu_row, px_row, w1, w1i, weff, mq, beff, C, R, R_TOT, DZ,
            MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr, FOLD_ROWS: tl.constexpr,
            OC: tl.constexpr, PAD: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """``h = relu(W1 z)`` of one sample ([BLOCK_R], zero past R_TOT); z built chunk by chunk,
    ``z = w_eff . (q - mq) + b_eff`` (se: w_eff = 1, mq = b_eff = 0)."""
    ii = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    jj = tl.arange(0, JP)
    h = tl.zeros([BLOCK_R], dtype=ACC)
    for k0 in range(0, DZ, BLOCK_K):
        k = k0 + kk
        km = k < DZ
        if MODE == 1:
            # double_fc: rows [0, R) read u through W1, rows [R, 2R) read x through W1_identity
            zu = tl.load(pu_row + k, mask=km, other=0.0)
            zx = tl.load(px_row + k, mask=km, other=0.0)
            wa = tl.load(w1 + ii[:, None] * DZ + k[None, :], mask=(ii[:, None] < R) & km[None, :], other=0.0)
            wb = tl.load(w1i + (ii[:, None] - R) * DZ + k[None, :],
                         mask=(ii[:, None] >= R) & (ii[:, None] < R_TOT) & km[None, :], other=0.0)
            # select, not add: a masked-out 0 weight times an inf pool would make a NaN
            h += tl.sum(tl.where(ii[:, None] < R, wa * zu[None, :], wb * zx[None, :]), axis=1)
        else:
            q = _patch(pu_row, px_row, k[:, None], jj[None, :], km[:, None], MODE, FOLD_M, FOLD_ROWS, OC, PAD)
            z = tl.sum((q - mq[None, :]) * weff[None, :], axis=1) + beff
            w = tl.load(w1 + ii[:, None] * DZ + k[None, :], mask=(ii[:, None] < R_TOT) & km[None, :], other=0.0)
            h += tl.sum(w * z[None, :], axis=1)
    h = tl.where(ii < R_TOT, h, 0.0)  # padded rows: 0 * inf from masked weights must not leak into fc2
    return tl.where(h < 0.0, 0.0, h)  # relu; NaN propagates, as torch.relu


@triton.jit
def _rows_times(w, mat, JP: tl.constexpr):
    """``out[i, :] = mat @ w[i, :]`` for symmetric ``mat`` [JP, JP], without a 3D register tile."""
    jj = tl.arange(0, JP)
    out = tl.zeros_like(w)
    for j in tl.static_range(JP):
        wj = tl.sum(tl.where(jj[None, :] == j, w, 0.0), axis=1)
        row = tl.sum(tl.where(jj[:, None] == j, mat, 0.0), axis=0)
        out += wj[:, None] * row[None, :]
    return out


@triton.jit
def _sample_moments(pu_row, px_row, dv_row, mom_row, DM, MODE: tl.constexpr, JP: tl.constexpr,
                    FOLD_M: tl.constexpr, FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr,
                    ACC: tl.constexpr, DO_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-sample patch moments (and dv sums in the backward) into ``mom_row`` (layout above)."""
    mm = tl.arange(0, BLOCK_M)
    jj = tl.arange(0, JP)
    s1 = tl.zeros([JP], dtype=ACC)
    for p0 in range(0, DM, BLOCK_M):
        pos = p0 + mm
        q = _patch(pu_row, px_row, pos[:, None], jj[None, :], (pos < DM)[:, None], MODE, FOLD_M, FOLD_ROWS, OC, PAD)
        s1 += tl.sum(q, axis=0)
    mean = s1 / DM
    m2 = tl.zeros([JP, JP], dtype=ACC)
    s1c = tl.zeros([JP], dtype=ACC)
    s0 = tl.zeros([BLOCK_M], dtype=ACC)
    for p0 in range(0, DM, BLOCK_M):
        pos = p0 + mm
        pm = pos < DM
        q = _patch(pu_row, px_row, pos[:, None], jj[None, :], pm[:, None], MODE, FOLD_M, FOLD_ROWS, OC, PAD)
        d = tl.where(pm[:, None], q - mean[None, :], 0.0)
        m2 += tl.sum(d[:, :, None] * d[:, None, :], axis=0)
        if DO_DV:
            dv = tl.load(dv_row + pos, mask=pm, other=0.0)
            s0 += dv
            s1c += tl.sum(dv[:, None] * d, axis=0)
    tl.store(mom_row + jj, mean)
    tl.store(mom_row + JP + jj, s1c)
    tl.store(mom_row + 2 * JP + jj, tl.where(jj == 0, tl.sum(s0, axis=0), 0.0), mask=jj == 0)
    tl.store(mom_row + 2 * JP + 1 + jj[:, None] * JP + jj[None, :], m2)


@triton.jit
def _combine_moments(mom, N, DM, ACC: tl.constexpr, JP: tl.constexpr, DO_DV: tl.constexpr):
    """Batch moments from per-sample rows, exact and in fixed order: ``(mean_q, C2, S0, S1c)``."""
    MS = 2 * JP + 1 + JP * JP
    jj = tl.arange(0, JP)
    mq = tl.zeros([JP], dtype=ACC)
    for n in range(N):
        mq += tl.load(mom + n * MS + jj)
    mq = mq / N
    c2 = tl.zeros([JP, JP], dtype=ACC)
    s1c = tl.zeros([JP], dtype=ACC)
    s0 = tl.zeros([JP], dtype=ACC)  # every lane holds the same sum
    for n in range(N):
        row = mom + n * MS
        d = tl.load(row + jj) - mq
        c2 += tl.load(row + 2 * JP + 1 + jj[:, None] * JP + jj[None, :]) + DM * (d[:, None] * d[None, :])
        if DO_DV:
            s0n = tl.load(row + 2 * JP + jj * 0)
            s1c += tl.load(row + JP + jj) + s0n * d
            s0 += s0n
    return mq, c2, tl.max(s0, axis=0), s1c


@triton.jit
def _bn_stats_kernel(mom, pw, bn_mean, bn_invstd, qmean, run_mean, run_var, N, DM, E,
                     eps_hi, eps_lo, mom_hi, mom_lo,
                     ACC: tl.constexpr, J: tl.constexpr, JP: tl.constexpr, BLOCK_E: tl.constexpr):
    """Training BN statistics of every filter from the patch moments; updates the running stats.

    One program: the combine reads ``N x MS`` values, far below one launch's cost."""
    mq, c2, _s0, _s1c = _combine_moments(mom, N, DM, ACC, JP, False)
    m_count = _as_acc(N * DM, ACC)
    cov = c2 / m_count
    ei = tl.arange(0, BLOCK_E)
    jj = tl.arange(0, JP)
    em = ei < E
    w = tl.load(pw + ei[:, None] * J + jj[None, :], mask=em[:, None] & (jj[None, :] < J), other=0.0)
    mu = tl.sum(w * mq[None, :], axis=1)
    var = tl.sum(w * _rows_times(w, cov, JP), axis=1)
    var = tl.where(var < 0.0, 0.0, var)  # rounding can go below 0; NaN propagates (tl.maximum would drop it)
    eps = _split_float(eps_hi, eps_lo, ACC)
    momentum = _split_float(mom_hi, mom_lo, ACC)
    tl.store(bn_mean + ei, mu, mask=em)
    tl.store(bn_invstd + ei, _rsqrt(var + eps, ACC), mask=em)
    tl.store(qmean + jj, mq)
    old_m = tl.load(run_mean + ei, mask=em, other=0.0).to(ACC)
    old_v = tl.load(run_var + ei, mask=em, other=0.0).to(ACC)
    tl.store(run_mean + ei, (1.0 - momentum) * old_m + momentum * mu, mask=em)
    unbiased = var * (m_count / (m_count - 1.0))
    tl.store(run_var + ei, (1.0 - momentum) * old_v + momentum * unbiased, mask=em)


@triton.jit
def _mlp_backward_sample(n, dg, hidden, w1, w1i, w2, dhp, dz, C, R, R_TOT, DZ, DZO,
                         MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One sample: ``dh_pre = (W2^T dg) * (h > 0)`` and ``dz = W1^T dh_pre`` (double_fc: [du; dx])."""
    ii = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_K)
    rm = ii < R_TOT
    dh = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cc
        cm = c < C
        d = tl.load(dg + n * C + c, mask=cm, other=0.0)
        w = tl.load(w2 + c[:, None] * R_TOT + ii[None, :], mask=cm[:, None] & rm[None, :], other=0.0)
        dh += tl.sum(w * d[:, None], axis=0)
    h = tl.load(hidden + n * R_TOT + ii, mask=rm, other=0.0)
    dh = tl.where(h > 0, dh, 0.0)
    tl.store(dhp + n * R_TOT + ii, dh, mask=rm)
    for k0 in range(0, DZO, BLOCK_K):
        k = k0 + kk
        if MODE == 1:
            wa = tl.load(w1 + ii[:, None] * C + k[None, :], mask=(ii[:, None] < R) & (k[None, :] < C), other=0.0)
            wb = tl.load(w1i + (ii[:, None] - R) * C + (k[None, :] - C),
                         mask=(ii[:, None] >= R) & rm[:, None] & (k[None, :] >= C) & (k[None, :] < 2 * C),
                         other=0.0)
            w = wa + wb
        else:
            w = tl.load(w1 + ii[:, None] * DZ + k[None, :], mask=rm[:, None] & (k[None, :] < DZ), other=0.0)
        tl.store(dz + n * DZO + k, tl.sum(w * dh[:, None], axis=0), mask=k < DZO)


@triton.jit
def _small_backward_sample(n, dg, hidden, w1, w1i, w2, dhp, dz, pu, px, mom, C, R, R_TOT, DZ, DZO,
                           MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                           FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr,
                           MOMENTS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """The MLP backward of sample n, then (pair modes) its patch/dv moments."""
    _mlp_backward_sample(n, dg, hidden, w1, w1i, w2, dhp, dz, C, R, R_TOT, DZ, DZO,
                         MODE, ACC, BLOCK_C, BLOCK_K, BLOCK_R)
    if MOMENTS:
        tl.debug_barrier()  # dz of this sample was written by other threads of this program
        MS = 2 * JP + 1 + JP * JP
        _sample_moments(pu + n * C, px + n * C, dz + n * DZO, mom + n * MS, DZ, MODE, JP,
                        FOLD_M, FOLD_ROWS, OC, PAD, ACC, True, BLOCK_M)


@triton.jit
def _mlp_backward_kernel(dg, hidden, w1, w1i, w2, dhp, dz, pu, px, mom, C, R, R_TOT, DZ, DZO,
                         MODE: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                         FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr,
                         MOMENTS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (N,): :func:`_small_backward_sample` (when the grad-gate kernel ran in chunks)."""
    _small_backward_sample(tl.program_id(0), dg, hidden, w1, w1i, w2, dhp, dz, pu, px, mom, C, R, R_TOT, DZ, DZO,
                           MODE, JP, FOLD_M, FOLD_ROWS, OC, PAD, MOMENTS, ACC, BLOCK_C, BLOCK_K, BLOCK_R, BLOCK_M)


@triton.jit
def _pair_cell_grad(pu_row, px_row, dv_row, coef, c, cm, FLOW: tl.constexpr, TRAINING: tl.constexpr,
                    MODE: tl.constexpr, J: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                    FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Transposed pair-view conv, gather form: gradient of pool ``FLOW`` (0 u, 1 x) of channels
    ``c``: the sum over taps j of ``dq_j`` at the map position that tap j reads this cell from."""
    OR = FOLD_ROWS - 2 + 2 * PAD
    jj = tl.arange(0, JP)
    mq = tl.load(coef + JP + jj)
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for j in tl.static_range(J):
        if (MODE != 2) or (j == FLOW):
            if MODE == 4:
                orow = 2 * (c // FOLD_M) + FLOW - j // 3 + PAD
                ocol = c % FOLD_M - j % 3 + PAD
                valid = cm & (orow >= 0) & (orow < OR) & (ocol >= 0) & (ocol < OC)
                pos = orow * OC + ocol
            elif MODE == 3:
                pos = 2 * c + FLOW
                valid = cm
            else:
                pos = c
                valid = cm
            dv = tl.load(dv_row + pos, mask=valid, other=0.0)
            val = tl.load(coef + j) * dv + tl.load(coef + 2 * JP + j)
            if TRAINING:
                brow = tl.load(coef + 3 * JP + j * JP + jj)
                q = _patch(pu_row, px_row, pos[:, None], jj[None, :], valid[:, None], MODE, FOLD_M, FOLD_ROWS, OC, PAD)
                val += tl.sum((q - mq[None, :]) * brow[None, :], axis=1)
            acc += tl.where(valid, val, 0.0)
    return acc


@triton.jit
def _weight_grad_kernel(dg, hidden, dhp, pu, px, pw, gamma, beta, bn_mean, bn_invstd,
                        dw1, dw1i, dw2, dz, coef, dpool, N, C, R, R_TOT, DZ, E, NB_W2, NB_W,
                        MODE: tl.constexpr, J: tl.constexpr, JP: tl.constexpr, FOLD_M: tl.constexpr,
                        FOLD_ROWS: tl.constexpr, OC: tl.constexpr, PAD: tl.constexpr, TRAINING: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_E: tl.constexpr, BLOCK_CP: tl.constexpr):
    """``dW2 = dg^T h`` (programs [0, NB_W2)), ``dW1 = dh_pre^T z`` ([NB_W2, NB_W)): one tile each,
    samples summed in order (deterministic, no atomics). Pair modes: programs [NB_W, NB_W + N)
    scatter the patch gradients of one sample back onto its pools (``dpool[n] = [du; dx]``)."""
    pid = tl.program_id(0)
    ii = tl.arange(0, BLOCK_R)
    rm = ii < R_TOT
    # names differ per branch: Triton requires same-named values to agree in type across branches
    if pid >= NB_W:
        if MODE >= 2:
            n = pid - NB_W
            for c0 in range(0, C, BLOCK_CP):
                cp = c0 + tl.arange(0, BLOCK_CP)
                cpm = cp < C
                for f in tl.static_range(2):
                    dp = _pair_cell_grad(pu + n * C, px + n * C, dz + n * DZ, coef, cp, cpm, f, TRAINING, MODE, J,
                                         JP, FOLD_M, FOLD_ROWS, OC, PAD, ACC, BLOCK_CP)
                    tl.store(dpool + n * 2 * C + f * C + cp, dp, mask=cpm)
    elif pid < NB_W2:
        c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=ACC)
        for n in range(N):
            d = tl.load(dg + n * C + c, mask=cm, other=0.0)
            hv = tl.load(hidden + n * R_TOT + ii, mask=rm, other=0.0)
            acc2 += d[:, None] * hv[None, :]
        tl.store(dw2 + c[:, None] * R_TOT + ii[None, :], acc2, mask=cm[:, None] & rm[None, :])
    else:
        k = (pid - NB_W2) * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < DZ
        jj = tl.arange(0, JP)
        if MODE >= 2:
            mean, invstd = _load_bn_stats(bn_mean, bn_invstd, E, 0.0, False, ACC, BLOCK_E)
            mq = tl.load(coef + JP + jj)  # batch mean of the patches (_pair_backward_stats_kernel)
            weff, beff = _bn_affine(pw, gamma, beta, mean, invstd, mq, E, J, JP, BLOCK_E)
        else:
            weff = tl.full([JP], 1.0, ACC)
            mq = tl.zeros([JP], dtype=ACC)
            beff = 0.0
        acc1 = tl.zeros([BLOCK_R, BLOCK_K], dtype=ACC)
        for n1 in range(N):
            dh = tl.load(dhp + n1 * R_TOT + ii, mask=rm, other=0.0)
            if MODE == 1:
                zu = tl.load(pu + n1 * C + k, mask=km, other=0.0)
                zx = tl.load(px + n1 * C + k, mask=km, other=0.0)
                z2 = tl.where((ii < R)[:, None], zu[None, :], zx[None, :])
                acc1 += dh[:, None] * z2
            else:
                q = _patch(pu + n1 * C, px + n1 * C, k[:, None], jj[None, :], km[:, None],
                           MODE, FOLD_M, FOLD_ROWS, OC, PAD)
                z = tl.sum((q - mq[None, :]) * weff[None, :], axis=1) + beff
                acc1 += dh[:, None] * z[None, :]
        if MODE == 1:
            tl.store(dw1 + ii[:, None] * DZ + k[None, :], acc1, mask=(ii < R)[:, None] & km[None, :])
            tl.store(dw1i + (ii[:, None] - R) * DZ + k[None, :], acc1,
                     mask=((ii >= R) & rm)[:, None] & km[None, :])
        else:
            tl.store(dw1 + ii[:, None] * DZ + k[None, :], acc1, mask=rm[:, None] & km[None, :])


@triton.jit
def _pair_backward_stats_kernel(mom, pw, gamma, bn_mean, bn_invstd, dpw, dgamma, dbeta, coef, N, DM, E,
                                TRAINING: tl.constexpr, ACC: tl.constexpr, J: tl.constexpr,
                                JP: tl.constexpr, BLOCK_E: tl.constexpr):
    """BN + pair-conv backward from batch sums (SPEC section 2), one program.

    With ``delta_i = w_i . mean_q - mu_i`` (0 in training), ``s_i = invstd_i``, ``g_i = gamma_i``:
    ``dgamma_i = s_i (w_i . S1c + S0 delta_i) / e``, ``dbeta_i = S0 / e``; training
    ``dw_i = g_i s_i (S1c / e - dgamma_i s_i (C2 w_i + M delta_i mean_q) / M)``, eval
    ``dw_i = g_i s_i (S1c + S0 mean_q) / e``. The patch gradient at every map position is then
    ``dq = w_eff dv + B (q - mean_q) + c`` whose coefficients go to ``coef``:
    ``[w_eff (JP), mean_q (JP), c (JP), B (JP x JP)]``."""
    mq, c2, s0, s1c = _combine_moments(mom, N, DM, ACC, JP, True)
    m_count = _as_acc(N * DM, ACC)
    ei = tl.arange(0, BLOCK_E)
    jj = tl.arange(0, JP)
    em = ei < E
    w = tl.load(pw + ei[:, None] * J + jj[None, :], mask=em[:, None] & (jj[None, :] < J), other=0.0)
    mean, sd = _load_bn_stats(bn_mean, bn_invstd, E, 0.0, False, ACC, BLOCK_E)
    g = tl.load(gamma + ei, mask=em, other=0.0)
    delta = tl.where(em, tl.sum(w * mq[None, :], axis=1) - mean, 0.0)
    dgam = sd * (tl.sum(w * s1c[None, :], axis=1) + s0 * delta) / E
    gs = g * sd
    weff = tl.sum(gs[:, None] * w, axis=0) / E
    if TRAINING:
        c2w = _rows_times(w, c2, JP)
        snq = sd[:, None] * (c2w + m_count * delta[:, None] * mq[None, :])
        dw = gs[:, None] * (s1c[None, :] / E - (dgam / m_count)[:, None] * snq)
        t = gs * sd * dgam / m_count
        bmat = tl.zeros([JP, JP], dtype=ACC)
        for j in tl.static_range(JP):  # B = -sum_i t_i w_i w_i^T, row by row
            tw = t * tl.sum(tl.where(jj[None, :] == j, w, 0.0), axis=1)
            bmat -= tl.where(jj[:, None] == j, tl.sum(tw[:, None] * w, axis=0)[None, :], 0.0)
        cvec = -tl.sum((t * delta)[:, None] * w, axis=0) - weff * s0 / m_count
    else:
        dw = gs[:, None] * (s1c[None, :] + s0 * mq[None, :]) / E
        bmat = tl.zeros([JP, JP], dtype=ACC)
        cvec = tl.zeros([JP], dtype=ACC)
    tl.store(dpw + ei[:, None] * J + jj[None, :], dw, mask=em[:, None] & (jj[None, :] < J))
    tl.store(dgamma + ei, dgam, mask=em)
    tl.store(dbeta + ei, tl.zeros([BLOCK_E], dtype=ACC) + s0 / E, mask=em)
    tl.store(coef + jj, weff)
    tl.store(coef + JP + jj, mq)
    tl.store(coef + 2 * JP + jj, cvec)
    tl.store(coef + 3 * JP + jj[:, None] * JP + jj[None, :], bmat)
