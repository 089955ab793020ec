// A stand-in for <cuda_runtime.h> that lets the block-level device code of csrc/cuda (staged.cuh,
// slot_table.cuh) compile as plain C++ and run on the CPU: each CUDA thread of a block is a std::thread,
// __syncthreads() is a barrier, threadIdx is thread-local. Enough for checking indexing, tails, the
// vector path and the barriers of a kernel on a machine without a GPU (tests/test_cuda_emulated.py).
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline thread_local EmuDim3 blockIdx;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// error codes, for host code such as slot_table.cuh's by_layout
enum cudaError_t { cudaSuccess = 0, cudaErrorUnknown = 999 };

inline std::barrier<>* emu_block_barrier = nullptr;  // the running block's barrier
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
