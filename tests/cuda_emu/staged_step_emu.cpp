// Runs the CUDA step's block code on the CPU, block after block, one std::thread per CUDA thread, over tensors
// read from stdin; prints the updated p and m. Driven by tests/test_cuda_emulated.py.
// Arguments: "staged" (default: csrc/cuda/staged.cuh, 3×3 components), "sorted" (its code-sorted variant), "thread"
// (kernels.cu's slot_kernel: step_at of csrc/fgsgd/batched.h, one thread per component, no staging),
// "sqnorm" (staged_sqnorm_block: prints ‖ξ_i‖² of every component instead of p and m, weight_decay as wd),
// "threadsqnorm" (slot_kernel's sqnorm_at, printed as with "sqnorm"), "rows L" (csrc/cuda/rows.cuh: L×1 row
// components, one block per row), or "rowsqnorm L" (row_sqnorm_block: ‖ξ_i‖² of L×1 rows, printed as with "sqnorm").
//
// stdin (whitespace separated): T_bytes momentum dampening nesterov weight_decay lr first_step stabilize
//   use_rescale use_groups ntensors, then the run-time controls (csrc/fgsgd/step_control.h): found_inf (-1: none)
//   lr_kind (0: none, 1: float32, 2: float64) lr_value stabilize_every use_steps grad_scale (0: none), then per
//   tensor: n off_p off_g
//   off_m ngroups [step count, with use_steps], then per tensor its
//   p g m (n·E each, E = 9 or L), codes (n), rescale (n, if used), group_index (n) and group_scale (ngroups)
//   (if used).
//   off_*: the tensor's first element sits that many elements past a 64-byte boundary.
// With EMU_PACKED=1 in the environment the codes go to the kernels packed, 2 bits per component
// (fgsgd_cuda/codes.py; at most 4 distinct codes per tensor). EMU_INTERLEAVE="L_0 L_1 ..." (one per tensor) sets
// TensorSlot::interleave: a nonzero L_k makes tensor k's p and g (read and printed as they lie in memory) the
// channels-last filters of an (n/L_k, L_k, 3, 3) weight.
// stdout: per tensor, p then m (n·E each), "%.17g"; then, with use_steps, every tensor's step count after the
// step (the count launch of kernels.cu, count_step_of_slot, after each table's blocks).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cuda/rows.cuh"
#include "cuda/staged.cuh"

using namespace fgsgd;

template <class T>
struct Buffer {  // n values at `off` elements past a 64-byte boundary, a sentinel all around them
  static constexpr double kSentinel = -7777.25;
  std::vector<T> storage;
  T* data;
  int64_t n;
  Buffer(int64_t n_, int off) : storage(size_t(n_ + off) + 128 / sizeof(T), T(kSentinel)), n(n_) {
    uintptr_t a = reinterpret_cast<uintptr_t>(storage.data());
    a = (a + 63) & ~uintptr_t(63);
    data = reinterpret_cast<T*>(a) + off;
  }
  bool outside_untouched() const {  // nothing written before or after the n values
    for (size_t i = 0; i < storage.size(); ++i) {
      const T* q = storage.data() + i;
      if ((q < data || q >= data + n) && *q != T(kSentinel)) return false;
    }
    return true;
  }
};

// The blocks of one launch's table, block after block: one std::thread per CUDA thread (`threads` of them),
// a barrier for __syncthreads, body(b) the block code.
template <class T, class F>
void run_blocks(const cuda::SlotTable<T>& table, int threads, F&& body) {
  for (int64_t b = 0; b < table.block_start[table.count]; ++b) {
    std::barrier<> bar(threads);
    emu_block_barrier = &bar;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        threadIdx.x = unsigned(t);
        blockIdx.x = unsigned(b);
        body(b);
      });
    for (auto& th : pool) th.join();
  }
}

template <class T>
int run(const std::string& mode, int64_t row_len, bool sqnorm = false) {
  const bool sorted = mode == "sorted";
  const int64_t E = row_len > 0 ? row_len : 9;  // elements per component
  double mom, damp, wd, lr;
  int nest, first, stab, use_r, use_g, nt;
  std::cin >> mom >> damp >> nest >> wd >> lr >> first >> stab >> use_r >> use_g >> nt;
  StepHParams<T> h{T(lr), T(mom), T(damp), T(wd), nest != 0, first != 0, stab != 0};
  double found_inf_v, lr_v, grad_scale_v;
  int lr_kind, use_steps;
  int64_t every;
  std::cin >> found_inf_v >> lr_kind >> lr_v >> every >> use_steps >> grad_scale_v;
  static float found_inf_f, lr_f32, grad_scale_f;
  grad_scale_f = float(grad_scale_v);
  static double lr_f64;
  found_inf_f = float(found_inf_v);
  lr_f32 = float(lr_v);
  lr_f64 = lr_v;
  const StepControl ctl{found_inf_v >= 0 ? &found_inf_f : nullptr, lr_kind == 1 ? &lr_f32 : nullptr,
                        lr_kind == 2 ? &lr_f64 : nullptr, grad_scale_v > 0 ? &grad_scale_f : nullptr, every};
  std::vector<int64_t> n(nt);
  std::vector<int> op(nt), og(nt), om(nt), ng(nt);
  std::vector<float> steps(nt, 0.0f);
  for (int k = 0; k < nt; ++k) {
    std::cin >> n[k] >> op[k] >> og[k] >> om[k] >> ng[k];
    if (use_steps) std::cin >> steps[k];
  }
  std::vector<Buffer<T>> p, g, m, r, gs;
  std::vector<std::vector<uint8_t>> codes(nt);
  std::vector<std::vector<int32_t>> gi(nt);
  std::vector<std::vector<uint32_t>> packed(nt);
  const char* packed_env = std::getenv("EMU_PACKED");
  const bool use_packed = packed_env != nullptr && std::string(packed_env) == "1";
  std::vector<TensorSlot<T>> slots(nt);
  auto read = [](T* dst, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      double v;
      std::cin >> v;
      dst[i] = T(v);
    }
  };
  for (int k = 0; k < nt; ++k) {
    p.emplace_back(n[k] * E, op[k]);
    g.emplace_back(n[k] * E, og[k]);
    m.emplace_back(n[k] * E, om[k]);
    r.emplace_back(n[k], 0);
    gs.emplace_back(ng[k], 0);
    read(p[k].data, n[k] * E);
    read(g[k].data, n[k] * E);
    read(m[k].data, n[k] * E);
    codes[k].resize(n[k]);
    for (auto& c : codes[k]) {
      int v;
      std::cin >> v;
      c = uint8_t(v);
    }
    if (use_r) read(r[k].data, n[k]);
    if (use_g) {
      gi[k].resize(n[k]);
      for (auto& v : gi[k]) std::cin >> v;
      read(gs[k].data, ng[k]);
    }
    slots[k] = TensorSlot<T>{p[k].data, g[k].data, m[k].data, codes[k].data(), use_r ? r[k].data : nullptr,
                             use_g ? gi[k].data() : nullptr, use_g ? gs[k].data : nullptr, nullptr, n[k],
                             use_steps ? &steps[k] : nullptr};
  }
  if (const char* il = std::getenv("EMU_INTERLEAVE"); il != nullptr && *il != '\0') {
    std::istringstream in(il);
    for (int k = 0; k < nt; ++k) {
      in >> slots[k].interleave;
      if (!in || slots[k].interleave < 0 || (slots[k].interleave > 0 && n[k] % slots[k].interleave != 0)) {
        std::fprintf(stderr, "EMU_INTERLEAVE: tensor %d needs L >= 0 that divides n\n", k);
        return 5;
      }
    }
  }
  for (int k = 0; k < nt && use_packed; ++k) {  // palette of the tensor's distinct codes, then 16 codes a word
    std::vector<uint8_t> pal;
    for (uint8_t c : codes[k])
      if (std::find(pal.begin(), pal.end(), c) == pal.end()) pal.push_back(c);
    if (pal.size() > 4) {
      std::fprintf(stderr, "tensor %d: more than 4 distinct codes cannot be packed\n", k);
      return 4;
    }
    while (pal.size() < 4) pal.push_back(pal.empty() ? 0 : pal[0]);
    packed[k].assign(size_t(1 + (n[k] + 15) / 16), 0u);
    for (int v = 0; v < 4; ++v) packed[k][0] |= uint32_t(pal[v]) << (8 * v);
    for (int64_t i = 0; i < n[k]; ++i) {
      const uint32_t v = uint32_t(std::find(pal.begin(), pal.end(), codes[k][size_t(i)]) - pal.begin());
      packed[k][size_t(1 + i / 16)] |= v << (2 * (i % 16));
    }
    slots[k].codes = nullptr;
    slots[k].packed_codes = packed[k].data();
  }
  if (!std::cin) {
    std::fprintf(stderr, "bad input\n");
    return 2;
  }
  constexpr int kT = cuda::kThreads;
  alignas(16) static T sp[kT * 9], sg[kT * 9], sm[kT * 9];  // the block's shared memory
  static int scratch[cuda::kSortScratchInts<kT>];
  static T red[2 * cuda::kRowThreads];
  if (row_len > 0 && !sqnorm) {  // what launch_rows does: one block of kRowThreads per row
    if (h.momentum == T(0))
      for (auto& s : slots) s.m = nullptr;  // as op_impl.h passes no buffers then
    for (int first_slot = 0; first_slot < nt; first_slot += cuda::kSlotsPerLaunch) {
      const cuda::SlotTable<T> table = cuda::next_table(slots.data(), nt, first_slot, 1);
      run_blocks(table, cuda::kRowThreads,
                 [&](int64_t b) { cuda::row_step_block<cuda::kRowThreads>(table, h, ctl, row_len, b, red); });
      for (int t = 0; t < cuda::kSlotsPerLaunch; ++t) cuda::count_step_of_slot(table, ctl, t);
    }
  }
  std::vector<std::vector<double>> outs(nt);
  for (int k = 0; k < nt && sqnorm; ++k) {
    outs[k].assign(size_t(n[k]), -1.0);
    slots[k].out = outs[k].data();
  }
  for (int first_slot = 0; first_slot < nt && sqnorm; first_slot += cuda::kSlotsPerLaunch) {
    if (row_len > 0) {
      const cuda::SlotTable<T> table = cuda::next_table(slots.data(), nt, first_slot, 1);
      run_blocks(table, cuda::kRowThreads,
                 [&](int64_t b) { cuda::row_sqnorm_block<cuda::kRowThreads>(table, h.weight_decay, row_len, b, red); });
    } else if (mode == "threadsqnorm") {  // slot_kernel<Op::kSqnorm> of kernels.cu
      const cuda::SlotTable<T> table = cuda::next_table(slots.data(), nt, first_slot);
      run_blocks(table, kT, [&](int64_t b) {
        const int t = cuda::slot_of_block(table, b);
        const int64_t i = (b - table.block_start[t]) * kT + threadIdx.x;
        if (i < table.slot[t].n) sqnorm_at(Fixed<3, 3>{}, table.slot[t], h.weight_decay, i);
      });
    }
  }
  if (sqnorm && row_len == 0 && mode != "threadsqnorm")  // as kernels.cu launch_slots: by layout, then in tables
    cuda::by_layout(slots.data(), nt, [&](const TensorSlot<T>* part, int count, auto layout) {
      for (int first_slot = 0; first_slot < count; first_slot += cuda::kSlotsPerLaunch) {
        const cuda::SlotTable<T> table = cuda::next_table(part, count, first_slot);
        run_blocks(table, kT, [&](int64_t b) {
          cuda::staged_sqnorm_block<kT, decltype(layout)::value>(Fixed<3, 3>{}, table, h.weight_decay, b, sp, sg);
        });
      }
      return cudaSuccess;
    });
  if (sqnorm) {
    for (int k = 0; k < nt; ++k)
      for (int64_t i = 0; i < n[k]; ++i) std::printf("%.17g\n", outs[k][size_t(i)]);
    return 0;
  }
  if (row_len == 0)  // as kernels.cu launch_slots: by layout, then in tables
    cuda::by_layout(slots.data(), nt, [&](const TensorSlot<T>* part, int count, auto layout) {
      constexpr bool kIl = decltype(layout)::value;
      for (int first_slot = 0; first_slot < count; first_slot += cuda::kSlotsPerLaunch) {
        const cuda::SlotTable<T> table = cuda::next_table(part, count, first_slot);
        run_blocks(table, kT, [&](int64_t b) {
          if (mode == "thread") {  // slot_kernel<Op::kStep> of kernels.cu
            const int t = cuda::slot_of_block(table, b);
            const int64_t i = (b - table.block_start[t]) * kT + threadIdx.x;
            if (i < table.slot[t].n && !step_skipped(ctl))
              step_at(Fixed<3, 3>{}, table.slot[t], resolve_step(h, ctl, table.slot[t].step), i);
          } else if (sorted) {
            cuda::staged_step_block<kT, true, kIl>(Fixed<3, 3>{}, table, h, ctl, b, sp, sg, sm, scratch);
          } else {
            cuda::staged_step_block<kT, false, kIl>(Fixed<3, 3>{}, table, h, ctl, b, sp, sg, sm);
          }
        });
        for (int t = 0; t < cuda::kSlotsPerLaunch; ++t) cuda::count_step_of_slot(table, ctl, t);
      }
      return cudaSuccess;
    });
  for (int k = 0; k < nt; ++k) {
    if (!p[k].outside_untouched() || !m[k].outside_untouched() || !g[k].outside_untouched()) {
      std::fprintf(stderr, "tensor %d: a value outside the tensor was written\n", k);
      return 3;
    }
  }
  for (int k = 0; k < nt; ++k) {
    for (int64_t i = 0; i < n[k] * E; ++i) std::printf("%.17g\n", double(p[k].data[i]));
    for (int64_t i = 0; i < n[k] * E; ++i) std::printf("%.17g\n", double(m[k].data[i]));
  }
  if (use_steps)
    for (int k = 0; k < nt; ++k) std::printf("%.17g\n", double(steps[k]));
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "staged";
  const int64_t row_len = (mode == "rows" || mode == "rowsqnorm") && argc > 2 ? std::atoll(argv[2]) : 0;
  int bytes;
  std::cin >> bytes;
  const bool sq = mode == "sqnorm" || mode == "rowsqnorm" || mode == "threadsqnorm";
  return bytes == 8 ? run<double>(mode, row_len, sq) : run<float>(mode, row_len, sq);
}
