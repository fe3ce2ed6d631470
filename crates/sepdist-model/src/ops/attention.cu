// Memory-lean attention (the FlashAttention-2 algorithm) on CUDA: the kernels of
// ops/attention.rs's FlashAttn, FlashAttnPacked and FlashAttnBwd, compiled at run time with
// NVRTC (ops/attention_cuda.rs). No headers: bf16 is handled as its bits, so the source
// compiles on any NVRTC without include paths.
//
// Layouts (all contiguous): q, k, v `[BH, T, d]` in the input dtype (f32 or bf16); the
// forward writes `[BH, T, d+1]` in f32 (output ‖ log-sum-exp: the lse stays f32 for the
// backward even for bf16 inputs); the backward reads that and its f32 gradient and writes
// `[3, BH, T, d]` = (dq, dk, dv) in the input dtype. Every sum is f32.
//
// One thread per query row (forward, dq) or key row (dk, dv) with the row's vectors in
// registers (`D` is the head size rounded up to 16, 32, 64 or 128) and the other side's rows
// streamed through shared memory in tiles. Grid: x = batch·head, y = tile of 64 rows.

typedef unsigned short bf16_bits;

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_bits* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void store(float* p, long long i, float x) { p[i] = x; }
// Round to nearest even, as the `half` crate's `bf16::from_f32` (candle's casts) does.
__device__ __forceinline__ void store(bf16_bits* p, long long i, float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16_bits)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_bits)(u >> 16);
}

#define ROWS 64

// Rows `r0 .. r0+TILE` of the `[T, d]` matrix at `src` into `dst` (`[TILE][D]`, zero-padded).
template <typename T, int D, int TILE>
__device__ __forceinline__ void load_tile(float (*dst)[D], const T* src, int r0, int t, int d) {
    for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
        int j = e / D, c = e % D;
        dst[j][c] = (r0 + j < t && c < d) ? load(src, (long long)(r0 + j) * d + c) : 0.f;
    }
}

template <typename T, int D, int TILE>
__device__ void flash_fwd(const T* q, const T* k, const T* v, float* out, int t, int d, float scale) {
    __shared__ float ks[TILE][D];
    __shared__ float vs[TILE][D];
    const long long base = (long long)blockIdx.x * t * d;
    const int i = blockIdx.y * ROWS + threadIdx.x;
    const bool active = i < t;
    q += base;
    k += base;
    v += base;
    float qr[D], acc[D];
#pragma unroll
    for (int c = 0; c < D; ++c) {
        qr[c] = (active && c < d) ? load(q, (long long)i * d + c) * scale : 0.f;
        acc[c] = 0.f;
    }
    float m = __int_as_float(0xff800000);  // -inf
    float l = 0.f;
    for (int k0 = 0; k0 < t; k0 += TILE) {
        const int nk = min(TILE, t - k0);
        __syncthreads();
        load_tile<T, D, TILE>(ks, k, k0, t, d);
        load_tile<T, D, TILE>(vs, v, k0, t, d);
        __syncthreads();
        if (!active) continue;
        for (int j = 0; j < nk; ++j) {
            float s = 0.f;
#pragma unroll
            for (int c = 0; c < D; ++c) s += qr[c] * ks[j][c];
            // The running max only moves now and then: rescale then, not per key.
            if (s > m) {
                const float alpha = expf(m - s);
                l *= alpha;
#pragma unroll
                for (int c = 0; c < D; ++c) acc[c] *= alpha;
                m = s;
            }
            const float p = expf(s - m);
            l += p;
#pragma unroll
            for (int c = 0; c < D; ++c) acc[c] += p * vs[j][c];
        }
    }
    if (!active) return;
    const float inv = 1.f / l;
    float* row = out + ((long long)blockIdx.x * t + i) * (d + 1);
#pragma unroll
    for (int c = 0; c < D; ++c)
        if (c < d) row[c] = acc[c] * inv;
    row[d] = m + logf(l);
}

// dq per query row, and `delta_i = rowsum(dO ∘ O)_i − g_lse_i` for the dk/dv kernel.
template <typename T, int D, int TILE>
__device__ void flash_bwd_dq(const T* q, const T* k, const T* v, const float* o, const float* g,
                             T* dq, float* delta, int t, int d, float scale) {
    __shared__ float ks[TILE][D];
    __shared__ float vs[TILE][D];
    const long long base = (long long)blockIdx.x * t * d;
    const int i = blockIdx.y * ROWS + threadIdx.x;
    const bool active = i < t;
    q += base;
    k += base;
    v += base;
    dq += base;
    float qr[D], gr[D], acc[D];
    float lse = 0.f, di = 0.f;
    if (active) {
        const long long r = ((long long)blockIdx.x * t + i) * (d + 1);
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < D; ++c) {
            if (c < d) dot += o[r + c] * g[r + c];
        }
        di = dot - g[r + d];
        lse = o[r + d];
        delta[(long long)blockIdx.x * t + i] = di;
    }
#pragma unroll
    for (int c = 0; c < D; ++c) {
        const bool ok = active && c < d;
        qr[c] = ok ? load(q, (long long)i * d + c) : 0.f;
        gr[c] = ok ? g[((long long)blockIdx.x * t + i) * (d + 1) + c] : 0.f;
        acc[c] = 0.f;
    }
    for (int k0 = 0; k0 < t; k0 += TILE) {
        const int nk = min(TILE, t - k0);
        __syncthreads();
        load_tile<T, D, TILE>(ks, k, k0, t, d);
        load_tile<T, D, TILE>(vs, v, k0, t, d);
        __syncthreads();
        if (!active) continue;
        for (int j = 0; j < nk; ++j) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < D; ++c) {
                s += qr[c] * ks[j][c];
                dp += gr[c] * vs[j][c];
            }
            const float p = expf(s * scale - lse);
            const float ds = p * (dp - di);
#pragma unroll
            for (int c = 0; c < D; ++c) acc[c] += ds * ks[j][c];
        }
    }
    if (!active) return;
#pragma unroll
    for (int c = 0; c < D; ++c)
        if (c < d) store(dq, (long long)i * d + c, acc[c] * scale);
}

// dk and dv per key row, over tiles of query rows (q, dO, lse, delta).
template <typename T, int D, int TILE>
__device__ void flash_bwd_dkdv(const T* q, const T* k, const T* v, const float* o, const float* g,
                               const float* delta, T* dk, T* dv, int t, int d, float scale) {
    __shared__ float qs[TILE][D];
    __shared__ float gs[TILE][D];
    __shared__ float lse_s[TILE];
    __shared__ float delta_s[TILE];
    const long long base = (long long)blockIdx.x * t * d;
    const long long row0 = (long long)blockIdx.x * t;
    const int j = blockIdx.y * ROWS + threadIdx.x;
    const bool active = j < t;
    q += base;
    k += base;
    v += base;
    dk += base;
    dv += base;
    float kr[D], vr[D], dka[D], dva[D];
#pragma unroll
    for (int c = 0; c < D; ++c) {
        const bool ok = active && c < d;
        kr[c] = ok ? load(k, (long long)j * d + c) : 0.f;
        vr[c] = ok ? load(v, (long long)j * d + c) : 0.f;
        dka[c] = 0.f;
        dva[c] = 0.f;
    }
    for (int q0 = 0; q0 < t; q0 += TILE) {
        const int nq = min(TILE, t - q0);
        __syncthreads();
        load_tile<T, D, TILE>(qs, q, q0, t, d);
        for (int e = threadIdx.x; e < TILE * D; e += blockDim.x) {
            const int r = e / D, c = e % D;
            gs[r][c] = (q0 + r < t && c < d) ? g[(row0 + q0 + r) * (d + 1) + c] : 0.f;
        }
        for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
            const bool ok = q0 + r < t;
            lse_s[r] = ok ? o[(row0 + q0 + r) * (d + 1) + d] : 0.f;
            delta_s[r] = ok ? delta[row0 + q0 + r] : 0.f;
        }
        __syncthreads();
        if (!active) continue;
        for (int r = 0; r < nq; ++r) {
            float s = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < D; ++c) {
                s += qs[r][c] * kr[c];
                dp += gs[r][c] * vr[c];
            }
            const float p = expf(s * scale - lse_s[r]);
            const float ds = p * (dp - delta_s[r]);
#pragma unroll
            for (int c = 0; c < D; ++c) {
                dva[c] += p * gs[r][c];
                dka[c] += ds * qs[r][c];
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int c = 0; c < D; ++c) {
        if (c < d) {
            store(dk, (long long)j * d + c, dka[c] * scale);
            store(dv, (long long)j * d + c, dva[c]);
        }
    }
}

// Tiles of 64 rows (32 KB of shared memory at D = 64), 32 rows at D = 128.
#define KERNELS(NAME, T, D, TILE)                                                                 \
    extern "C" __global__ void __launch_bounds__(ROWS)                                            \
        flash_fwd_##NAME##_##D(const T* q, const T* k, const T* v, float* out, int t, int d,      \
                               float scale) {                                                     \
        flash_fwd<T, D, TILE>(q, k, v, out, t, d, scale);                                         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(ROWS)                                            \
        flash_bwd_dq_##NAME##_##D(const T* q, const T* k, const T* v, const float* o,             \
                                  const float* g, T* dq, float* delta, int t, int d,              \
                                  float scale) {                                                  \
        flash_bwd_dq<T, D, TILE>(q, k, v, o, g, dq, delta, t, d, scale);                          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(ROWS)                                            \
        flash_bwd_dkdv_##NAME##_##D(const T* q, const T* k, const T* v, const float* o,           \
                                    const float* g, const float* delta, T* dk, T* dv, int t,      \
                                    int d, float scale) {                                         \
        flash_bwd_dkdv<T, D, TILE>(q, k, v, o, g, delta, dk, dv, t, d, scale);                    \
    }

KERNELS(f32, float, 16, 64)
KERNELS(f32, float, 32, 64)
KERNELS(f32, float, 64, 64)
KERNELS(f32, float, 128, 32)
KERNELS(bf16, bf16_bits, 16, 64)
KERNELS(bf16, bf16_bits, 32, 64)
KERNELS(bf16, bf16_bits, 64, 64)
KERNELS(bf16, bf16_bits, 128, 32)
