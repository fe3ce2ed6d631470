// The two index maps of the STFT as DFT matmuls (stft_dft.rs), for f32 and f64:
//
// frames:  out[s, f, k] = x[s, reflect(f0·hop + f·hop + offset + k)]   (f < fc, k < w)
// adjoint: acc[s, i] += alpha · Σ g[s, f, k] over the (f, k) of the chunk that frames reads
//          x[s, i] from — the overlap-add of the frames folded back through the reflect
//          padding, as a gather (one thread per output sample, no atomics: deterministic).
// With reflect == 0 positions outside [0, n) read zero and receive nothing (the iSTFT's
// overlap-add trimmed to its length, and that map's adjoint).
//
// `offset` is where frame 0's first sample sits relative to the unpadded signal (negative:
// the centred STFT's reflect padding, plus the window's offset inside n_fft). Positions
// reflect once: the callers check |offset| and the frames' reach against n.

__device__ __forceinline__ long long reflect_index(long long i, long long n) {
    if (i < 0) i = -i;
    if (i >= n) i = 2 * (n - 1) - i;
    return i;
}

// floor(a / b) for b > 0.
__device__ __forceinline__ long long floor_div(long long a, long long b) {
    long long q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

template <typename T>
__device__ void frames(const T* x, T* out, long long signals, long long n, long long f0,
                       long long fc, long long hop, long long offset, long long w,
                       int reflect) {
    long long total = signals * fc * w;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)blockDim.x * gridDim.x) {
        long long s = e / (fc * w);
        long long r = e - s * fc * w;
        long long f = r / w;
        long long k = r - f * w;
        long long i = (f0 + f) * hop + offset + k;
        if (reflect) {
            out[e] = x[s * n + reflect_index(i, n)];
        } else {
            out[e] = (i >= 0 && i < n) ? x[s * n + i] : (T)0;
        }
    }
}

// Adds the frames of [f0, f0 + fc) that cover padded position q to acc.
template <typename T>
__device__ __forceinline__ T gather_position(const T* g, long long s, long long q, long long f0,
                                             long long fc, long long hop, long long offset,
                                             long long w) {
    long long rel = q - offset;  // = f·hop + k
    long long lo = floor_div(rel - (w - 1) + hop - 1, hop);  // ceil((rel - w + 1) / hop)
    long long hi = floor_div(rel, hop);
    if (lo < f0) lo = f0;
    if (hi > f0 + fc - 1) hi = f0 + fc - 1;
    T acc = 0;
    for (long long f = lo; f <= hi; ++f) {
        acc += g[(s * fc + (f - f0)) * w + (rel - f * hop)];
    }
    return acc;
}

template <typename T>
__device__ void adjoint(const T* g, T* acc, long long signals, long long n, long long f0,
                        long long fc, long long hop, long long offset, long long w, int reflect,
                        T alpha) {
    long long total = signals * n;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)blockDim.x * gridDim.x) {
        long long s = e / n;
        long long i = e - s * n;
        // The padded positions that reflect onto i: i itself, -i (left), 2(n-1) - i (right).
        T sum = gather_position(g, s, i, f0, fc, hop, offset, w);
        if (reflect && i > 0) sum += gather_position(g, s, -i, f0, fc, hop, offset, w);
        if (reflect && i < n - 1) {
            sum += gather_position(g, s, 2 * (n - 1) - i, f0, fc, hop, offset, w);
        }
        acc[e] += alpha * sum;
    }
}

#define STFT_KERNELS(T, NAME)                                                                  \
    extern "C" __global__ void stft_frames_##NAME(const T* x, T* out, long long signals,      \
                                                   long long n, long long f0, long long fc,    \
                                                   long long hop, long long offset,            \
                                                   long long w, int reflect) {                 \
        frames<T>(x, out, signals, n, f0, fc, hop, offset, w, reflect);                        \
    }                                                                                          \
    extern "C" __global__ void stft_adjoint_##NAME(const T* g, T* acc, long long signals,     \
                                                    long long n, long long f0, long long fc,   \
                                                    long long hop, long long offset,           \
                                                    long long w, int reflect, T alpha) {       \
        adjoint<T>(g, acc, signals, n, f0, fc, hop, offset, w, reflect, alpha);                \
    }

STFT_KERNELS(float, f32)
STFT_KERNELS(double, f64)
