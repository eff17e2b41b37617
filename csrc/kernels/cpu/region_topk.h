// region_topk CPU core: torch-free. One pass buckets the entries by label (a stable counting sort of
// their 64-bit rank keys, chunk-parallel), then each label keeps the k largest keys of its bucket.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "../common/region_topk_common.h"

namespace clipfast {
namespace cpu {

constexpr int64_t kTopkChunk = 1 << 16;  // entries per counting chunk

// scores [n]; labels [n] (outside [0, num_labels) ignored); counts [num_labels];
// indices [num_labels, k] (-1 padded). n < 2^32.
template <typename ParallelFor>
void region_topk(const float* scores, const int64_t* labels, int64_t n, int64_t num_labels, int64_t k,
                 int64_t* counts, int64_t* indices, ParallelFor&& parallel_for) {
  const int64_t chunks = (n + kTopkChunk - 1) / kTopkChunk;
  // 1. Per-chunk label histograms.
  std::vector<int64_t> offsets(chunks * num_labels, 0);
  parallel_for(int64_t{0}, chunks, [&](int64_t lo, int64_t hi) {
    for (int64_t chunk = lo; chunk < hi; ++chunk) {
      int64_t* hist = offsets.data() + chunk * num_labels;
      for (int64_t i = chunk * kTopkChunk; i < std::min(n, (chunk + 1) * kTopkChunk); ++i)
        if (labels[i] >= 0 && labels[i] < num_labels) ++hist[labels[i]];
    }
  });
  // 2. Bucket starts: label-major, chunk-minor, so each bucket keeps index order.
  std::vector<int64_t> starts(num_labels + 1, 0);
  int64_t running = 0;
  for (int64_t label = 0; label < num_labels; ++label) {
    starts[label] = running;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t count = offsets[chunk * num_labels + label];
      offsets[chunk * num_labels + label] = running;
      running += count;
    }
    counts[label] = running - starts[label];
  }
  starts[num_labels] = running;
  // 3. Scatter the keys into their buckets.
  std::vector<uint64_t> keys(running);
  parallel_for(int64_t{0}, chunks, [&](int64_t lo, int64_t hi) {
    for (int64_t chunk = lo; chunk < hi; ++chunk) {
      int64_t* cursor = offsets.data() + chunk * num_labels;
      for (int64_t i = chunk * kTopkChunk; i < std::min(n, (chunk + 1) * kTopkChunk); ++i)
        if (labels[i] >= 0 && labels[i] < num_labels) keys[cursor[labels[i]]++] = rank_key(scores[i], i);
    }
  });
  // 4. The k largest keys of each bucket, best first.
  parallel_for(int64_t{0}, num_labels, [&](int64_t lo, int64_t hi) {
    for (int64_t label = lo; label < hi; ++label) {
      uint64_t* first = keys.data() + starts[label];
      uint64_t* last = keys.data() + starts[label + 1];
      const int64_t take = std::min<int64_t>(k, last - first);
      std::partial_sort(first, first + take, last, std::greater<uint64_t>());
      int64_t* out = indices + label * k;
      for (int64_t j = 0; j < take; ++j) out[j] = key_index(first[j]);
      for (int64_t j = take; j < k; ++j) out[j] = -1;
    }
  });
}

}  // namespace cpu
}  // namespace clipfast
