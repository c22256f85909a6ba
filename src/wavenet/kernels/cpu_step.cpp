// Autoregressive WaveNet generation on the CPU: every layer of many steps in one call.
//
// Built and loaded by cpu_step.py (plain C ABI through ctypes: no torch headers, so it compiles in about a
// second). The arithmetic is IncrementalWaveNet.step's, on its own ring buffers and rewritten weights; only
// the order of the float sums and the tanh approximation differ. What the eager step spends per sample is
// ~170 tensor calls of dispatch (~1 us each); here a step is the matrix-vector products themselves, run over
// groups of up to kMaxGroup streams so that each weight vector loaded serves every stream of the group, from
// weights laid out in the order the products read them (blocked matrices, see Net).
//
// Two ways to use several threads (the caller picks by timing both, cpu_step.py's _ThreadChoice):
// - Ranges: each thread runs its own range of streams, never waiting for the others.
// - Split, for one group of streams (batch <= kMaxGroup): the threads split every layer's gated channels, in
//   whole blocks (so at most dilation / kBlock threads: 4 for conf/model/small.yaml, 8 for medium). A group
//   reads every weight once a step, and once the weights outgrow one core's L2 (conf/model/small.yaml: 2.5 MB
//   of float32 against 2 MB here) it waits on the shared L3; split across cores, each core's share stays in
//   its own L2. The price is one barrier per layer, to exchange the gated channels that the residual and the
//   skip sums need (each thread then sums its share of the skip channels over all gated channels).
// Every plan computes the same bits (each sum in the same order), so the plan, picked by timing, never changes
// the samples a seed draws.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxGroup = 8;
// Weight matrices are stored in blocks of kBlock columns (see Net). Output columns per register tile (kTile): a
// whole number of blocks, times kMaxGroup streams of accumulators: 16 of the 32 AVX-512 registers, or all 16
// AVX2 ones. kLanes: floats per vector register, for the compiler's vector extensions (see Vec).
constexpr int64_t kBlock = 16;
#if defined(__AVX512F__)
constexpr int64_t kTile = 32;
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kTile = 16;
constexpr int kLanes = 8;
#else
constexpr int64_t kTile = 16;
constexpr int kLanes = 4;
#endif
// Chains per stream in calls of two streams (see accumulate_tile): as many as leave AVX2's 16 registers room.
constexpr int kPairChains = kLanes == 16 ? 4 : 2;
static_assert(kTile % kBlock == 0, "a tile is whole blocks");
static_assert(kBlock % kLanes == 0, "a block is whole vectors");

// The network, laid out by cpu_step.py. A weight matrix (in, out) is stored "blocked": its columns cut into
// blocks of kBlock (the last one padded with zeros), each block (in, kBlock) row-major, the blocks one after
// another. A tile of outputs then reads each of its blocks as one sequential stream over all rows (not a
// piece of every row: that took 1.4x as long for `small`'s layers on one core), and a thread's share of the
// columns is whole blocks. Matrices are of float32, or of bfloat16 where `bf16_weights` is set (half the bytes
// to read per step); everything else is float32 throughout.
struct Net {
    int64_t layers, taps, residual, dilation, skip, hidden, classes;
    int64_t period;
    int64_t bf16_weights;
    const int64_t* tap_columns;      // (period, layers * taps): ring column of each layer's past taps
    const int64_t* write_columns;    // (period, layers): ring column that each layer's input goes to
    const float* embedding;          // (classes, residual)
    const void* filter_gate;         // (layers, 2) blocked ((taps + 1) * residual, dilation): filter, then gate;
                                     // rows: past taps, then the current input
    const float* filter_gate_bias;   // (layers, 2 * dilation)
    const void* residual_weight;     // (layers - 1) blocked (dilation, residual)
    const void* skip_weight;         // blocked (layers * dilation, skip)
    const float* skip_bias;          // (skip)
    const void* head_weight;         // blocked (skip, hidden)
    const float* head_bias;          // (hidden)
    const void* output_weight;       // blocked (hidden, classes)
    const float* output_bias;        // (classes)
};

inline int64_t blocks(int64_t columns) { return (columns + kBlock - 1) / kBlock; }

// Elements of a blocked matrix of `rows` rows and `columns` columns.
inline int64_t blocked_size(int64_t rows, int64_t columns) { return blocks(columns) * kBlock * rows; }

// Vectors of kLanes floats, through the compiler's vector extensions (GCC and Clang, any target): auto-vectorised
// loops of the same tile arithmetic did not keep the accumulators in registers (measured on `small`'s layers:
// 2.1x slower at one stream, 2.4x at eight).
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));

// A bfloat16 is the upper half of a float32's bits: widening it is a shift.
using BFloat16 = uint16_t;
inline Vec load(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline Vec load(const BFloat16* p) {
    using Words = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
    // One widening load (vpmovzxwd) on AVX-512 and AVX2, where the generic form below compiles to several
    // instructions: with it, bfloat16 weights ran slower than float32 on an AVX2 CPU (AMD EPYC, `small` at batch
    // 1: 13,900 samples/s against 15,100), with this 1.4x faster (19,800). (maskz: the plain AVX-512 intrinsic's
    // undefined source trips -Wmaybe-uninitialized.)
#if defined(__AVX512F__)
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const Words words = (Words)_mm512_maskz_cvtepu16_epi32(0xFFFF, halves);
#elif defined(__AVX2__)
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const Words words = (Words)_mm256_cvtepu16_epi32(halves);
#else
    using Halves = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    Halves halves;
    std::memcpy(&halves, p, sizeof halves);
    const Words words = __builtin_convertvector(halves, Words);
#endif
    return (Vec)(words << 16);
}

// y[g, :columns] += x[g, :n_in] @ w[:n_in, :columns] for the Blocks blocks of one tile, columns <= Blocks * kBlock
// (fewer only where Partial: the last block of a matrix or of a thread's share). Block b starts block_stride
// elements after block b - 1; consecutive rows of x and y are x_stride and y_stride elements apart. Each vector
// of weights is loaded (and widened) once for all G streams. Rows go to Chains sums in turn.
template <int G, int Chains, int Blocks, bool Partial, typename W>
void accumulate_tile(const float* x, int64_t x_stride, const W* w, int64_t block_stride, int64_t n_in,
                     int64_t columns, float* y, int64_t y_stride) {
    constexpr int per_block = kBlock / kLanes, vectors = Blocks * per_block;
    // With one stream, rows go round-robin to 4 independent sums: one sum per accumulator would wait out the FMA
    // latency at every row (measured on `small` at batch 1: 1.27x faster with bfloat16 weights, 1.07x float32;
    // no gain from 8 sums); in calls of two streams, to 2 each. Chains depend on the call, not the group: the order
    // of the sums must not depend on how a call's streams are grouped (one of 2 streams on each of 2 threads, or
    // a stream of 9 on one thread, is a group of one), or the threads' plan would change the samples.
    static_assert(Chains == 1 || Chains * G <= 4 * kPairChains / 2, "chains are for calls of one or two streams");
    constexpr int chains = Chains;
    Vec acc[chains][G][vectors] = {};
    for (int g = 0; g < G; ++g) {
        float start[vectors * kLanes] = {};  // zeros past `columns`: padded columns, never stored
        std::memcpy(start, y + g * y_stride, (Partial ? columns : vectors * kLanes) * sizeof(float));
        for (int v = 0; v < vectors; ++v) acc[0][g][v] = load(start + v * kLanes);
    }
    const auto add_row = [&](Vec(&sums)[G][vectors], int64_t i) {
        for (int v = 0; v < vectors; ++v) {
            const Vec weights = load(w + v / per_block * block_stride + i * kBlock + v % per_block * kLanes);
            for (int g = 0; g < G; ++g) sums[g][v] += x[g * x_stride + i] * weights;
        }
    };
    int64_t i = 0;
    for (; i + chains <= n_in; i += chains)
        for (int c = 0; c < chains; ++c) add_row(acc[c], i + c);
    for (; i < n_in; ++i) add_row(acc[0], i);
    for (int g = 0; g < G; ++g) {
        for (int c = 1; c < chains; ++c)
            for (int v = 0; v < vectors; ++v) acc[0][g][v] += acc[c][g][v];
        float end[vectors * kLanes];
        std::memcpy(end, acc[0][g], sizeof end);
        std::memcpy(y + g * y_stride, end, (Partial ? columns : vectors * kLanes) * sizeof(float));
    }
}

// y[g, :n_out] += x[g, :n_in] @ w[:n_in, :n_out] for the G streams of a group, w a blocked matrix from a
// block's first column (see accumulate_tile). Padded columns are read but never written to y.
template <int G, int Chains, typename W>
void accumulate(const float* x, int64_t x_stride, const W* w, int64_t block_stride, int64_t n_in, int64_t n_out,
                float* y, int64_t y_stride) {
    int64_t start = 0;
    for (; start + kTile <= n_out; start += kTile) {
        accumulate_tile<G, Chains, kTile / kBlock, false>(x, x_stride, w + start / kBlock * block_stride, block_stride, n_in,
                                                  kTile, y + start, y_stride);
    }
    for (; start < n_out; start += kBlock) {
        accumulate_tile<G, Chains, 1, true>(x, x_stride, w + start / kBlock * block_stride, block_stride, n_in,
                                    std::min(kBlock, n_out - start), y + start, y_stride);
    }
}

// tanh as a ratio of an odd and an even polynomial (the minimax form Eigen uses for float): max error a few
// float ulps, and unlike std::tanh it vectorises.
inline float fast_tanh(float x) {
    constexpr float kClamp = 7.90531110763549805f;  // beyond it tanh rounds to +-1 in float
    x = std::min(kClamp, std::max(-kClamp, x));
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p / q;
}

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// Threads of one call meet here once per layer: a few hundred nanoseconds when each has a core. Spinning
// gives way to the scheduler after a while, so oversubscribed cores slow a step down instead of stalling it.
class Barrier {
   public:
    explicit Barrier(int count) : count_(count) {}

    void wait() {
        const int generation = generation_.load(std::memory_order_acquire);
        if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
            arrived_.store(0, std::memory_order_relaxed);
            generation_.store(generation + 1, std::memory_order_release);
            return;
        }
        for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
            if (spins < 4096) {
                relax();
            } else {
                std::this_thread::yield();
            }
        }
    }

   private:
    const int count_;
    alignas(64) std::atomic<int> arrived_{0};
    alignas(64) std::atomic<int> generation_{0};
};

// One call's streams and its inputs and outputs. Rows of out, forced, noise and logits_out are `batch`
// streams long; `first` is the group's first stream there.
struct Streams {
    float* rings;  // the group's first stream; consecutive streams are ring_stride apart
    int64_t ring_stride;
    int64_t batch;
    int64_t first;
    const int64_t* classes;  // (batch,): step 0's input
    const int64_t* forced;   // (steps, batch) or null
    const float* noise;      // (steps, batch, classes) or null
    int64_t* out;            // (steps, batch)
    float* logits_out;       // (steps, batch, classes) or null
};

// What the threads of a split group share: every layer's gated channels, and the skip sums.
struct Shared {
    explicit Shared(const Net& net, int ranks, int group)
        : barrier(ranks), gated(net.layers * group * net.dilation), skip(group * net.skip) {}
    Barrier barrier;
    std::vector<float> gated;  // (layers, group, dilation)
    std::vector<float> skip;   // (group, skip)
};

// Streams s.first ... s.first + G - 1 for `steps` steps. With `shared`, this thread (`rank` of `ranks`)
// computes gated channels [lo, hi) of every layer and skip channels [skip_lo, skip_hi) from all gated channels,
// and the other threads the rest; without, all of them. Each skip channel is then summed over every layer's
// gated channels in the same order on however many threads, so every plan draws the same samples.
template <int G, int Chains, typename W>
void run_group(const Net& net, const Streams& s, int64_t steps, int64_t phase, Shared* shared, int rank,
               int ranks) {
    const int64_t L = net.layers, R = net.residual, D = net.dilation, S = net.skip, H = net.hidden;
    const int64_t Q = net.classes, taps = net.taps, rows = (taps + 1) * R;
    // Whole blocks of the gated channels each: a share that starts inside a block would read two part-blocks.
    const int64_t lo = std::min(D, kBlock * (blocks(D) * rank / ranks));
    const int64_t hi = std::min(D, kBlock * (blocks(D) * (rank + 1) / ranks)), part = hi - lo;
    const int64_t skip_lo = std::min(S, kBlock * (blocks(S) * rank / ranks));  // none where S has fewer blocks
    const int64_t skip_hi = std::min(S, kBlock * (blocks(S) * (rank + 1) / ranks));
    const bool writer = rank == 0;  // of what every thread computes alike: ring inputs, samples, logits
    std::vector<float> input(G * R), pre(G * 2 * part), own_gated(G * part), skip(G * S), hidden(G * H);
    std::vector<float> logits(G * Q);
    int64_t previous[G];
    for (int64_t step = 0; step < steps; ++step) {
        const int64_t row = (phase + step) % net.period;
        const int64_t* tap_columns = net.tap_columns + row * L * taps;
        const int64_t* write_columns = net.write_columns + row * L;
        for (int g = 0; g < G; ++g) {
            const int64_t b = s.first + g;
            const int64_t c = s.forced ? s.forced[step * s.batch + b] : step == 0 ? s.classes[b] : previous[g];
            std::memcpy(&input[g * R], net.embedding + c * R, R * sizeof(float));
            std::memcpy(&skip[g * S + skip_lo], net.skip_bias + skip_lo, (skip_hi - skip_lo) * sizeof(float));
        }
        for (int64_t l = 0; l < L; ++l) {
            // This thread's filter columns [lo, hi) into pre[:, :part], its gate columns into pre[:, part:].
            const W* weight = static_cast<const W*>(net.filter_gate) + 2 * l * blocked_size(rows, D);
            const float* bias = net.filter_gate_bias + l * 2 * D;
            for (int g = 0; g < G; ++g) {
                std::memcpy(&pre[g * 2 * part], bias + lo, part * sizeof(float));
                std::memcpy(&pre[g * 2 * part + part], bias + D + lo, part * sizeof(float));
            }
            for (int half = 0; half < 2; ++half) {
                const W* columns = weight + half * blocked_size(rows, D) + lo * rows;
                const int64_t block_stride = kBlock * rows;
                float* y = &pre[half * part];
                // A tap's ring column is the same for every stream: rows of x are one ring apart.
                for (int64_t k = 0; k < taps; ++k) {
                    const float* tap = s.rings + tap_columns[l * taps + k] * R;
                    accumulate<G, Chains>(tap, s.ring_stride, columns + k * R * kBlock, block_stride, R, part, y, 2 * part);
                }
                accumulate<G, Chains>(input.data(), R, columns + taps * R * kBlock, block_stride, R, part, y, 2 * part);
            }
            // The gate was halved: tanh(f) sigmoid(g) = tanh(f) (1 + tanh(g / 2)) / 2, the / 2 in the weights after.
            float* gated = shared ? &shared->gated[l * G * D] : nullptr;
            for (int g = 0; g < G; ++g) {
                const float* p = &pre[g * 2 * part];
                float* z = &own_gated[g * part];
                for (int64_t j = 0; j < part; ++j) {
                    const float f = fast_tanh(p[j]);
                    z[j] = f + f * fast_tanh(p[part + j]);
                }
                if (gated) std::memcpy(gated + g * D + lo, z, part * sizeof(float));
            }
            // Every thread has read this layer's taps before it arrives: the input may now go to the column
            // of its oldest tap.
            if (shared) shared->barrier.wait();
            if (writer) {
                for (int g = 0; g < G; ++g)
                    std::memcpy(s.rings + g * s.ring_stride + write_columns[l] * R, &input[g * R], R * sizeof(float));
            }
            const float* all_gated = shared ? gated : own_gated.data();
            if (l + 1 < L) {
                const W* residual = static_cast<const W*>(net.residual_weight) + l * blocked_size(D, R);
                accumulate<G, Chains>(all_gated, D, residual, kBlock * D, D, R, input.data(), R);
            }
            const W* skip_weight = static_cast<const W*>(net.skip_weight) + skip_lo / kBlock * kBlock * L * D;
            accumulate<G, Chains>(all_gated, D, skip_weight + l * D * kBlock, kBlock * L * D, D, skip_hi - skip_lo,
                                   &skip[skip_lo], S);
        }
        if (shared) {
            for (int g = 0; g < G; ++g)
                std::memcpy(&shared->skip[g * S + skip_lo], &skip[g * S + skip_lo], (skip_hi - skip_lo) * sizeof(float));
            shared->barrier.wait();
            std::memcpy(skip.data(), shared->skip.data(), G * S * sizeof(float));
        }
        for (float& v : skip) v = std::max(v, 0.0f);
        for (int g = 0; g < G; ++g) std::memcpy(&hidden[g * H], net.head_bias, H * sizeof(float));
        accumulate<G, Chains>(skip.data(), S, static_cast<const W*>(net.head_weight), kBlock * S, S, H, hidden.data(), H);
        for (float& v : hidden) v = std::max(v, 0.0f);
        for (int g = 0; g < G; ++g) std::memcpy(&logits[g * Q], net.output_bias, Q * sizeof(float));
        accumulate<G, Chains>(hidden.data(), H, static_cast<const W*>(net.output_weight), kBlock * H, H, Q, logits.data(),
                      Q);
        for (int g = 0; g < G; ++g) {
            const int64_t b = s.first + g;
            float* z = &logits[g * Q];
            if (s.logits_out && writer) std::memcpy(s.logits_out + (step * s.batch + b) * Q, z, Q * sizeof(float));
            if (s.noise) {
                const float* n = s.noise + (step * s.batch + b) * Q;
                for (int64_t q = 0; q < Q; ++q) z[q] += n[q];
            }
            int64_t best = 0;  // the first of equal maxima, as torch.argmax
            for (int64_t q = 1; q < Q; ++q)
                if (z[q] > z[best]) best = q;
            previous[g] = best;
            if (writer) s.out[step * s.batch + b] = best;
        }
        // The skip parts of this step must all be read before any thread writes the next step's.
        if (shared) shared->barrier.wait();
    }
}

template <typename W>
void run_groups(const Net& net, const Streams& s, int64_t count, int64_t steps, int64_t phase, Shared* shared,
                int rank, int ranks) {
    for (int64_t done = 0; done < count; done += kMaxGroup) {
        Streams group = s;
        group.rings += done * s.ring_stride;
        group.first += done;
        if (s.batch <= 2) {  // calls of 1 and 2 streams sum in chains (see accumulate_tile), in groups of 1 or 2
            if (s.batch == 1) {
                run_group<1, 4, W>(net, group, steps, phase, shared, rank, ranks);
            } else if (count - done == 1) {
                run_group<1, kPairChains, W>(net, group, steps, phase, shared, rank, ranks);
            } else {
                run_group<2, kPairChains, W>(net, group, steps, phase, shared, rank, ranks);
            }
            continue;
        }
        switch (std::min<int64_t>(kMaxGroup, count - done)) {
            case 1: run_group<1, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 2: run_group<2, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 3: run_group<3, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 4: run_group<4, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 5: run_group<5, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 6: run_group<6, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            case 7: run_group<7, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
            default: run_group<8, 1, W>(net, group, steps, phase, shared, rank, ranks); break;
        }
    }
}

void run(const Net& net, const Streams& s, int64_t count, int64_t steps, int64_t phase, Shared* shared, int rank,
         int ranks) {
    if (net.bf16_weights) {
        run_groups<BFloat16>(net, s, count, steps, phase, shared, rank, ranks);
    } else {
        run_groups<float>(net, s, count, steps, phase, shared, rank, ranks);
    }
}

}  // namespace

// Runs `steps` steps of all `batch` streams from ring phase `phase` (the step counter modulo net->period) on
// `threads` threads: split over the gated channels where `split` is set and the batch is one group, else over
// streams.
extern "C" void wavenet_cpu_steps(const Net* net, float* rings, int64_t ring_stride, int64_t batch, int64_t steps,
                                  int64_t phase, int64_t threads, int64_t split, const int64_t* classes,
                                  const int64_t* forced, const float* noise, int64_t* out, float* logits_out) {
    const Streams all{rings, ring_stride, batch, 0, classes, forced, noise, out, logits_out};
    const bool split_channels = split && batch <= kMaxGroup;
    threads = std::max<int64_t>(1, std::min(threads, split_channels ? blocks(net->dilation) : batch));
    if (threads == 1) {
        run(*net, all, batch, steps, phase, nullptr, 0, 1);
        return;
    }
    // A thread that cannot be started (a process out of threads) costs speed, never the process: split
    // groups wait at a gate until all of theirs run, else run alone; ranges run on the caller instead.
    std::vector<std::thread> helpers;
    if (split_channels) {
        Shared shared(*net, static_cast<int>(threads), static_cast<int>(batch));
        std::atomic<int> gate{0};  // 1: all started, go; -1: give up
        try {
            for (int rank = 1; rank < threads; ++rank) {
                helpers.emplace_back([&, rank] {
                    int state;
                    while ((state = gate.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
                    if (state > 0) run(*net, all, batch, steps, phase, &shared, rank, static_cast<int>(threads));
                });
            }
            gate.store(1, std::memory_order_release);
        } catch (const std::system_error&) {
            gate.store(-1, std::memory_order_release);
        }
        if (gate.load() > 0) {
            run(*net, all, batch, steps, phase, &shared, 0, static_cast<int>(threads));
        }
        for (auto& helper : helpers) helper.join();
        if (gate.load() < 0) run(*net, all, batch, steps, phase, nullptr, 0, 1);
        return;
    }
    std::vector<Streams> ranges(threads, all);
    std::vector<int64_t> counts(threads);
    for (int64_t t = 0; t < threads; ++t) {
        const int64_t first = batch * t / threads, last = batch * (t + 1) / threads;
        ranges[t].rings += first * ring_stride;
        ranges[t].first = first;
        counts[t] = last - first;
    }
    std::vector<int64_t> inline_ranges{0};
    for (int64_t t = 1; t < threads; ++t) {
        try {
            helpers.emplace_back(run, std::cref(*net), std::cref(ranges[t]), counts[t], steps, phase, nullptr, 0, 1);
        } catch (const std::system_error&) {
            inline_ranges.push_back(t);
        }
    }
    for (const int64_t t : inline_ranges) run(*net, ranges[t], counts[t], steps, phase, nullptr, 0, 1);
    for (auto& helper : helpers) helper.join();
}

// Columns per block of the blocked weight matrices, for cpu_step.py to lay them out.
extern "C" int64_t wavenet_cpu_block() { return kBlock; }
