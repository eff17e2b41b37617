// The C++ core tests' tiny harness: count failed expectations, and a serial parallel_for.
#pragma once
#include <cstdint>
#include <cstdio>

namespace cpp_tests {

inline int failures = 0;

inline void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

// Stands in for at::parallel_for: the cores call fn(lo, hi) over chunks of [begin, end).
inline auto serial = [](int64_t begin, int64_t end, auto&& fn) { fn(begin, end); };

}  // namespace cpp_tests
