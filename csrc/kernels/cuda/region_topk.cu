// region_topk CUDA core. Bucket by label, then select per bucket; no spin locks, no order-dependent
// results (every entry has a unique 64-bit rank key, so the k best are a set, whatever the order in
// which atomics place them):
//   1. histogram_kernel: per-label counts (shared-memory histogram when num_labels <= 8192, else
//      global), warp-aggregated with __match_any_sync so one hot label costs one atomic per warp.
//   2. scan_kernel (one block, cub::BlockScan): bucket offsets, and the work units: a bucket is cut
//      into segments of S = max(16384, ceil(N / 1024)) keys, one unit each (a label with no entries
//      still gets one unit, which writes its -1 row); labels with several segments also get
//      candidate space (k keys per segment).
//   3. scatter_kernel: rank_key(score, index) of every entry into its bucket (warp-aggregated atomic
//      cursor per label; order inside a bucket is arbitrary).
//   4. select_kernel: one block per unit computes the unit's k best keys in shared memory: keys above
//      the current k-th best are appended to a 2048-key buffer; a full buffer is bitonic-sorted and
//      merged into the running top (bitonic top-k merge), which raises the threshold. A one-segment
//      label writes its output row; otherwise the unit writes its k best to the candidates.
//   5. merge_kernel: one block per multi-segment label runs the same selection over its candidates
//      (read rank-major: every segment's best first, so the threshold rises fast).
// A label that owns all N entries is thus spread over up to ~1024 blocks.
#include <cub/block/block_scan.cuh>

#include "region_topk.cuh"

namespace clipfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;                      // keys per thread per selection round
constexpr int kRound = kThreads * kItems;      // keys per selection round
constexpr int kBuffer = 2048;                  // candidate buffer (keys); >= kRound + kRound, >= max K2
constexpr int kMaxTop = static_cast<int>(kRegionTopkMaxK);
constexpr int kScanThreads = 1024;
constexpr int kSharedHistogramLabels = 8192;   // 32 KiB of shared counters
constexpr int64_t kMinSegment = 16384;
constexpr int64_t kTargetUnits = 1024;
constexpr int64_t kMaxGrid = int64_t{1} << 16;
constexpr unsigned kFull = 0xffffffffu;

static_assert(kBuffer >= 2 * kRound && kBuffer >= kMaxTop, "buffer too small");
static_assert((kBuffer & (kBuffer - 1)) == 0 && (kMaxTop & (kMaxTop - 1)) == 0, "powers of two");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t segment_size(int64_t n) {
  const int64_t s = ceil_div(n, kTargetUnits);
  return s > kMinSegment ? s : kMinSegment;
}

__device__ __forceinline__ unsigned lanemask_lt() {
  return (1u << (threadIdx.x & 31)) - 1u;
}

// Entry i's label as a bucket key (-1 past the end or out of range) and the lanes of this warp
// holding the same key, so that one lane per distinct label does the atomic. Whole warps only.
struct LaneLabel {
  int key;
  unsigned peers;
};

__device__ __forceinline__ LaneLabel label_of(const int64_t* __restrict__ labels, int64_t i, int64_t n,
                                              int64_t num_labels) {
  const int64_t label = i < n ? labels[i] : -1;
  const int key = label >= 0 && label < num_labels ? static_cast<int>(label) : -1;
  return LaneLabel{key, __match_any_sync(kFull, key)};
}

// ---- 1. histogram -------------------------------------------------------------------------------

template <bool kShared>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t num_labels,
                     uint32_t* __restrict__ hist) {
  extern __shared__ uint32_t s_hist[];
  const int lane = threadIdx.x & 31;
  if (kShared) {
    for (int64_t l = threadIdx.x; l < num_labels; l += kThreads) s_hist[l] = 0u;
    __syncthreads();
  }
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * 32; base < n;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {  // warp-uniform
    const int64_t i = base + lane;
    const LaneLabel lane_label = label_of(labels, i, n, num_labels);
    const int key = lane_label.key;
    const bool ok = key >= 0;
    const unsigned peers = lane_label.peers;
    if (ok && lane == __ffs(peers) - 1) {
      const uint32_t added = static_cast<uint32_t>(__popc(peers));
      if (kShared) atomicAdd(&s_hist[key], added);
      else atomicAdd(&hist[key], added);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t l = threadIdx.x; l < num_labels; l += kThreads)
      if (s_hist[l]) atomicAdd(&hist[l], s_hist[l]);
  }
}

// ---- 2. offsets ---------------------------------------------------------------------------------

__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const uint32_t* __restrict__ hist, int64_t num_labels, int64_t segment,
                uint32_t* __restrict__ bucket_offset, uint32_t* __restrict__ unit_offset,
                uint32_t* __restrict__ candidate_offset, int64_t* __restrict__ counts) {
  using Scan = cub::BlockScan<uint32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  uint32_t carry_bucket = 0, carry_unit = 0, carry_candidate = 0;
  for (int64_t base = 0; base < num_labels; base += kScanThreads) {  // block-uniform
    const int64_t l = base + threadIdx.x;
    const uint32_t count = l < num_labels ? hist[l] : 0u;
    uint32_t units = 0;
    if (l < num_labels) {
      const uint64_t segments = (static_cast<uint64_t>(count) + segment - 1) / segment;
      units = segments > 1 ? static_cast<uint32_t>(segments) : 1u;
    }
    const uint32_t candidates = units > 1 ? units : 0u;
    uint32_t bucket_at, unit_at, candidate_at, bucket_total, unit_total, candidate_total;
    Scan(temp).ExclusiveSum(count, bucket_at, bucket_total);
    __syncthreads();
    Scan(temp).ExclusiveSum(units, unit_at, unit_total);
    __syncthreads();
    Scan(temp).ExclusiveSum(candidates, candidate_at, candidate_total);
    __syncthreads();
    if (l < num_labels) {
      bucket_offset[l] = carry_bucket + bucket_at;
      unit_offset[l] = carry_unit + unit_at;
      candidate_offset[l] = carry_candidate + candidate_at;
      counts[l] = count;
    }
    carry_bucket += bucket_total;
    carry_unit += unit_total;
    carry_candidate += candidate_total;
  }
  if (threadIdx.x == 0) {
    bucket_offset[num_labels] = carry_bucket;
    unit_offset[num_labels] = carry_unit;
    candidate_offset[num_labels] = carry_candidate;
  }
}

// ---- 3. scatter ---------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const float* __restrict__ scores, const int64_t* __restrict__ labels, int64_t n,
                   int64_t num_labels, const uint32_t* __restrict__ bucket_offset, uint32_t* __restrict__ cursor,
                   uint64_t* __restrict__ keys) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * 32; base < n;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {  // warp-uniform
    const int64_t i = base + lane;
    const LaneLabel lane_label = label_of(labels, i, n, num_labels);
    const int key = lane_label.key;
    const bool ok = key >= 0;
    const unsigned peers = lane_label.peers;
    const int leader = __ffs(peers) - 1;
    uint32_t first = 0;
    if (ok && lane == leader) first = atomicAdd(&cursor[key], static_cast<uint32_t>(__popc(peers)));
    first = __shfl_sync(kFull, first, leader);
    if (ok) keys[bucket_offset[key] + first + __popc(peers & lanemask_lt())] = rank_key(scores[i], i);
  }
}

// ---- 4 / 5. selection ---------------------------------------------------------------------------

struct TopState {
  uint64_t top[kMaxTop];   // running best keys, descending; 0 = empty (no real key is 0)
  uint64_t buf[kBuffer];   // keys above the threshold, not yet merged
  int count;               // keys in buf
  uint64_t threshold;      // top[k - 1]: only larger keys can still enter the k best
};

// Sorts a[0, size) descending (size a power of two, >= 2 or trivially 1). Ends with a barrier.
__device__ __forceinline__ void bitonic_sort_desc(uint64_t* a, int size) {
  for (int block = 2; block <= size; block <<= 1) {
    for (int stride = block >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < size / 2; t += kThreads) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool desc = (i & block) == 0;
        const uint64_t x = a[i], y = a[j];
        if ((x < y) == desc) {
          a[i] = y;
          a[j] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Sorts a bitonic a[0, size) descending (half-cleaners). Ends with a barrier.
__device__ __forceinline__ void bitonic_merge_desc(uint64_t* a, int size) {
  for (int stride = size >> 1; stride > 0; stride >>= 1) {
    for (int t = threadIdx.x; t < size / 2; t += kThreads) {
      const int i = 2 * t - (t & (stride - 1));
      const int j = i + stride;
      const uint64_t x = a[i], y = a[j];
      if (x < y) {
        a[i] = y;
        a[j] = x;
      }
    }
    __syncthreads();
  }
}

// Merges buf[0, count) into the running top (top2 = power of two >= k). All threads; count is
// block-uniform; ends with a barrier.
__device__ __forceinline__ void flush(TopState& s, int count, int k, int top2) {
  int size = top2;
  while (size < count) size <<= 1;  // <= kBuffer
  for (int i = count + threadIdx.x; i < size; i += kThreads) s.buf[i] = 0;
  __syncthreads();
  bitonic_sort_desc(s.buf, size);
  // The top2 largest of two descending lists: max(top[i], buf[top2 - 1 - i]) is bitonic.
  for (int i = threadIdx.x; i < top2; i += kThreads) {
    const uint64_t x = s.top[i], y = s.buf[top2 - 1 - i];
    s.top[i] = x > y ? x : y;
  }
  __syncthreads();
  bitonic_merge_desc(s.top, top2);
  if (threadIdx.x == 0) {
    s.count = 0;
    s.threshold = s.top[k - 1];
  }
  __syncthreads();
}

// s.top[0, k) = the k largest of get(0), ..., get(len - 1) (0 past them). All threads call it with
// the same arguments.
template <typename Get>
__device__ __forceinline__ void block_topk(TopState& s, Get get, int64_t len, int k, int top2) {
  const int lane = threadIdx.x & 31;
  __syncthreads();  // the previous use of s is over
  for (int i = threadIdx.x; i < top2; i += kThreads) s.top[i] = 0;
  if (threadIdx.x == 0) {
    s.count = 0;
    s.threshold = 0;
  }
  __syncthreads();
  for (int64_t base = 0; base < len; base += kRound) {  // block-uniform
    const uint64_t threshold = s.threshold;
    uint64_t key[kItems];
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const int64_t i = base + it * kThreads + threadIdx.x;
      key[it] = i < len ? get(i) : 0;
    }
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const bool pass = key[it] > threshold;
      const unsigned mask = __ballot_sync(kFull, pass);
      if (mask) {  // warp-uniform
        const int leader = __ffs(mask) - 1;
        int at = 0;
        if (lane == leader) at = atomicAdd(&s.count, __popc(mask));
        at = __shfl_sync(kFull, at, leader);
        if (pass) s.buf[at + __popc(mask & lanemask_lt())] = key[it];
      }
    }
    __syncthreads();
    const int count = s.count;
    __syncthreads();  // everyone has read count before flush / the next round changes it
    if (count > kBuffer - kRound) flush(s, count, k, top2);
  }
  const int count = s.count;  // no writes since the last barrier
  if (count > 0) flush(s, count, k, top2);
}

__device__ __forceinline__ void write_row(const TopState& s, int64_t* __restrict__ row, int k, uint32_t count) {
  const int n = count < static_cast<uint32_t>(k) ? static_cast<int>(count) : k;
  for (int r = threadIdx.x; r < k; r += kThreads) row[r] = r < n ? key_index(s.top[r]) : -1;
}

__global__ void __launch_bounds__(kThreads)
    select_kernel(const uint64_t* __restrict__ keys, const uint32_t* __restrict__ hist,
                  const uint32_t* __restrict__ bucket_offset, const uint32_t* __restrict__ unit_offset,
                  const uint32_t* __restrict__ candidate_offset, uint64_t* __restrict__ candidates,
                  int64_t* __restrict__ indices, int64_t num_labels, int k, int top2, int64_t segment,
                  int64_t unit_bound) {
  __shared__ TopState s;
  const uint32_t total_units = unit_offset[num_labels];
  for (int64_t u = blockIdx.x; u < unit_bound && u < total_units; u += gridDim.x) {  // block-uniform
    // The label: unit_offset is strictly increasing (every label has >= 1 unit).
    int64_t lo = 0, hi = num_labels;  // unit_offset[lo] <= u < unit_offset[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (unit_offset[mid] <= u) lo = mid;
      else hi = mid;
    }
    const int64_t label = lo;
    const uint32_t first = unit_offset[label];
    const uint32_t units = unit_offset[label + 1] - first;
    const int64_t seg = u - first;
    const uint32_t count = hist[label];
    const int64_t start = seg * segment;
    const int64_t rest = static_cast<int64_t>(count) - start;
    const int64_t len = rest < segment ? (rest > 0 ? rest : 0) : segment;
    const uint64_t* src = keys + bucket_offset[label] + start;
    block_topk(s, [src](int64_t i) { return src[i]; }, len, k, top2);
    if (units == 1) {
      write_row(s, indices + label * k, k, count);
    } else {
      uint64_t* dst = candidates + (static_cast<int64_t>(candidate_offset[label]) + seg) * k;
      for (int r = threadIdx.x; r < k; r += kThreads) dst[r] = s.top[r];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    merge_kernel(const uint32_t* __restrict__ hist, const uint32_t* __restrict__ unit_offset,
                 const uint32_t* __restrict__ candidate_offset, const uint64_t* __restrict__ candidates,
                 int64_t* __restrict__ indices, int64_t num_labels, int k, int top2) {
  __shared__ TopState s;
  for (int64_t label = blockIdx.x; label < num_labels; label += gridDim.x) {
    const uint32_t units = unit_offset[label + 1] - unit_offset[label];
    if (units <= 1) continue;  // block-uniform; written by select_kernel
    const uint64_t* base = candidates + static_cast<int64_t>(candidate_offset[label]) * k;
    // Rank-major: position i is rank i / units of segment i % units (units <= 1025, so len < 2^32).
    auto get = [base, units, k](int64_t i) {
      const uint32_t r = static_cast<uint32_t>(i) / units;
      const uint32_t seg = static_cast<uint32_t>(i) - r * units;
      return base[static_cast<int64_t>(seg) * k + r];
    };
    block_topk(s, get, static_cast<int64_t>(units) * k, k, top2);
    write_row(s, indices + label * k, k, hist[label]);
  }
}

struct Layout {
  int64_t segment, max_units, candidate_keys;
  size_t hist, cursor, bucket_offset, unit_offset, candidate_offset, keys, candidates, total;
};

Layout make_layout(int64_t n, int64_t num_labels, int64_t k) {
  Layout l{};
  l.segment = segment_size(n);
  l.max_units = num_labels + ceil_div(n, l.segment);
  l.candidate_keys = 2 * ceil_div(n, l.segment) * k;  // multi-segment labels: sum of units < 2N / segment
  size_t at = 0;
  auto take = [&](int64_t count, size_t elem) {
    const size_t start = at;
    at += (static_cast<size_t>(count) * elem + 255) / 256 * 256;
    return start;
  };
  l.hist = take(num_labels, sizeof(uint32_t));
  l.cursor = take(num_labels, sizeof(uint32_t));
  l.bucket_offset = take(num_labels + 1, sizeof(uint32_t));
  l.unit_offset = take(num_labels + 1, sizeof(uint32_t));
  l.candidate_offset = take(num_labels + 1, sizeof(uint32_t));
  l.keys = take(n, sizeof(uint64_t));
  l.candidates = take(l.candidate_keys, sizeof(uint64_t));
  l.total = at;
  return l;
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

}  // namespace

size_t region_topk_workspace_bytes(int64_t n, int64_t num_labels, int64_t k) {
  return make_layout(n, num_labels, k).total;
}

cudaError_t region_topk(const float* scores, const int64_t* labels, int64_t n, int64_t num_labels, int64_t k,
                        int64_t* counts, int64_t* indices, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  if (n < 0 || n > kRegionTopkMaxEntries || num_labels < 0 || num_labels > kRegionTopkMaxLabels || k < 0 ||
      k > kRegionTopkMaxK)
    return cudaErrorInvalidValue;
  if (num_labels == 0) return cudaSuccess;
  const Layout l = make_layout(n, num_labels, k);
  if (workspace == nullptr || workspace_bytes < l.total || reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  uint32_t* hist = reinterpret_cast<uint32_t*>(ws + l.hist);
  uint32_t* cursor = reinterpret_cast<uint32_t*>(ws + l.cursor);
  uint32_t* bucket_offset = reinterpret_cast<uint32_t*>(ws + l.bucket_offset);
  uint32_t* unit_offset = reinterpret_cast<uint32_t*>(ws + l.unit_offset);
  uint32_t* candidate_offset = reinterpret_cast<uint32_t*>(ws + l.candidate_offset);
  uint64_t* keys = reinterpret_cast<uint64_t*>(ws + l.keys);
  uint64_t* candidates = reinterpret_cast<uint64_t*>(ws + l.candidates);
  cudaError_t status;

  // cursor directly follows hist: one memset clears both.
  if ((status = cudaMemsetAsync(hist, 0, l.bucket_offset - l.hist, stream)) != cudaSuccess) return status;
  const unsigned entry_grid = grid_for(ceil_div(n, kThreads));
  if (n > 0) {
    if (num_labels <= kSharedHistogramLabels)
      histogram_kernel<true><<<entry_grid, kThreads, num_labels * sizeof(uint32_t), stream>>>(labels, n,
                                                                                             num_labels, hist);
    else
      histogram_kernel<false><<<entry_grid, kThreads, 0, stream>>>(labels, n, num_labels, hist);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(hist, num_labels, l.segment, bucket_offset, unit_offset,
                                              candidate_offset, counts);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  if (k == 0) return cudaSuccess;
  if (n > 0) {
    scatter_kernel<<<entry_grid, kThreads, 0, stream>>>(scores, labels, n, num_labels, bucket_offset, cursor,
                                                        keys);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  int top2 = 1;
  while (top2 < k) top2 <<= 1;
  select_kernel<<<grid_for(l.max_units), kThreads, 0, stream>>>(keys, hist, bucket_offset, unit_offset,
                                                                candidate_offset, candidates, indices,
                                                                num_labels, static_cast<int>(k), top2,
                                                                l.segment, l.max_units);
  if ((status = cudaGetLastError()) != cudaSuccess) return status;
  if (n > l.segment) {  // only then can a label have several segments
    merge_kernel<<<grid_for(num_labels), kThreads, 0, stream>>>(hist, unit_offset, candidate_offset, candidates,
                                                                indices, num_labels, static_cast<int>(k), top2);
    if ((status = cudaGetLastError()) != cudaSuccess) return status;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace clipfast
