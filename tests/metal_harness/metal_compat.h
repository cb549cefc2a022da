// Metal Shading Language on the CPU: just enough of it to run MLX custom-kernel bodies as C++.
//
// What it emulates:
//  - types: uint, uint2, uint3, half/float16_t (_Float16), bfloat/bfloat16_t (round to
//    nearest even, as Metal converts), int64_t...
//  - metal:: math (float overloads, precise:: and fast:: as the same functions), min/max;
//  - threadgroup_barrier: a std::barrier over the real threads of the threadgroup;
//  - simd_sum / simd_max / simd_min / simd_broadcast: a per-simdgroup barrier exchange over
//    groups of 32 threads (summed in lane order, where the GPU uses a tree: rounding differs);
//  - the address-space qualifiers are defined by the generated wrapper (see runner.py): all
//    empty, and the body's threadgroup declarations become `static`, which makes a threadgroup
//    array one storage shared by the threads of a group (the runner runs groups one at a time).
// What it does not: memory-model subtleties (every barrier is a full fence, mem_device or
// not), the 32 KiB threadgroup-memory limit, register pressure, non-uniform simd control flow,
// uninitialised threadgroup memory (static storage starts at zero).
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;

struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };

typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
      bits = uint16_t((u >> 16) | 0x40);
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  bfloat16_t(double d) : bfloat16_t(float(d)) {}
  bfloat16_t(int i) : bfloat16_t(float(i)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;
static_assert(sizeof(bfloat16_t) == 2, "bfloat16_t must be 2 bytes");

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

namespace mh {

constexpr int SIMD_WIDTH = 32;

struct SimdGroup {
  int lanes;
  std::unique_ptr<std::barrier<>> bar;
  double buf[2][SIMD_WIDTH];
};

struct Group {
  std::barrier<> bar;
  std::vector<SimdGroup> simd;
  explicit Group(int n) : bar(n), simd((n + SIMD_WIDTH - 1) / SIMD_WIDTH) {
    for (int s = 0; s < int(simd.size()); ++s) {
      simd[s].lanes = std::min(SIMD_WIDTH, n - s * SIMD_WIDTH);
      simd[s].bar = std::make_unique<std::barrier<>>(simd[s].lanes);
    }
  }
};

struct ThreadState {
  Group* group = nullptr;
  int lane = 0, simd = 0, parity = 0;
};
inline thread_local ThreadState self;

// Every lane posts its value, then reads all of them. Two buffers alternate, so one barrier per
// call suffices: buffer p is rewritten only after every lane passed the next call's barrier.
template <class F>
inline double simd_exchange(double x, F reduce) {
  SimdGroup& sg = self.group->simd[self.simd];
  int p = self.parity;
  self.parity ^= 1;
  sg.buf[p][self.lane] = x;
  sg.bar->arrive_and_wait();
  return reduce(sg.buf[p], sg.lanes);
}

}  // namespace mh

inline void threadgroup_barrier(mem_flags) { mh::self.group->bar.arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { mh::self.group->simd[mh::self.simd].bar->arrive_and_wait(); }

template <class T>
inline T simd_sum(T x) {
  return T(mh::simd_exchange(double(float(x)), [](const double* v, int n) {
    float s = 0.0f;  // float accumulation, in lane order
    for (int l = 0; l < n; ++l) s += float(v[l]);
    return double(s);
  }));
}
inline int simd_sum(int x) {
  return int(mh::simd_exchange(double(x), [](const double* v, int n) {
    double s = 0;
    for (int l = 0; l < n; ++l) s += v[l];
    return s;
  }));
}
template <class T>
inline T simd_max(T x) {
  return T(mh::simd_exchange(double(x), [](const double* v, int n) {
    return *std::max_element(v, v + n);
  }));
}
template <class T>
inline T simd_min(T x) {
  return T(mh::simd_exchange(double(x), [](const double* v, int n) {
    return *std::min_element(v, v + n);
  }));
}
template <class T>
inline T simd_broadcast(T x, ushort lane) {
  return T(mh::simd_exchange(double(x), [lane](const double* v, int) { return v[lane]; }));
}

namespace metal {
using std::abs;
using std::max;
using std::min;
inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float log2(float x) { return std::log2(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float tanh(float x) { return std::tanh(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
namespace precise {
using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh;
}
namespace fast {
using metal::exp; using metal::log; using metal::sqrt; using metal::rsqrt; using metal::tanh;
}
}  // namespace metal

using namespace metal;  // as MLX's kernel headers do
