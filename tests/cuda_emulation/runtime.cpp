// The execution model behind cuda_emu.h, and the C entry points tests/_cuda_emulation.py calls.
//
// Blocks run one after the other; the threads of a block run as fibers (ucontext) on this one OS
// thread, each until it reaches __syncthreads() or returns. When no thread can run, either every
// live thread waits at the same barrier (the barrier opens: a new epoch starts) or something is
// wrong: threads wait at different barriers, or some exited while others wait (both reported, then
// the barrier opens anyway so the launch finishes).
//
// Shared-memory checks: the kernel files are compiled with -fsanitize=thread, which makes the
// compiler call __tsan_read4(addr), __tsan_write16(addr), ... around every memory access; this file
// is not instrumented and defines those hooks itself (no TSan runtime is linked). Accesses inside the
// shared-memory arena update shadow memory, one cell per 2-byte word: the epoch and thread of the
// last write, and of the last read(s). Reported: a word written by one thread and read or written by
// another in the same epoch (a race: a barrier is missing), a read of a word nothing wrote since the
// block started (the NaN poison would be read), and an access outside the bytes the launch gave.
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "launch.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

uint3 emu::thread_idx, emu::block_idx;
dim3 emu::block_dim, emu::grid_dim;

namespace emu {
namespace {

constexpr size_t kGuard = 64 * 1024;  // bytes on either side of the shared memory, to name stray accesses
constexpr size_t kCell = 2;           // shadow granularity in bytes (a __half)
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxErrorsPerKind = 4;
constexpr int kManyReaders = -2;

alignas(64) unsigned char arena[kGuard + kOptinDynamicShared + kGuard];
unsigned char* const shared = arena + kGuard;

// Zero-initialised (static): epoch 0 precedes every block, so a fresh cell reads as never written.
struct Cell {
  uint32_t write_epoch, read_epoch, poison_reported;  // poison_reported: block_first_epoch of the report
  int32_t writer, reader;
};
Cell shadow[kOptinDynamicShared / kCell];

enum class State { kReady, kAtBarrier, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::kDone;
  const char* file = nullptr;
  int line = 0;
};

struct Stats {
  long launches = 0, optin_launches = 0, blocks = 0, threads = 0, barriers = 0, shared_accesses = 0;
};

// Everything one launch needs while its fibers run.
struct Machine {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;  // running thread (flat index), -1 outside a kernel
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  const LaunchConfig* config = nullptr;
  uint32_t epoch = 0, block_first_epoch = 0;
  std::string epoch_start;  // "block start" or the barrier that opened the epoch
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute per kernel
  std::map<std::string, std::pair<long, std::vector<std::string>>> errors;  // kind -> (count, first messages)
  Stats stats;
} machine;

std::mutex entry_mutex;  // one emulated call at a time (ctypes releases the GIL)

// Keeps the first few messages of each kind (the message is only built for those) and counts all.
template <typename Message>
void report(const char* kind, Message&& message) {
  auto& [count, messages] = machine.errors[kind];
  if (messages.size() < kMaxErrorsPerKind) messages.push_back(message());
  ++count;
}

std::string where_in_grid() {
  const LaunchConfig& c = *machine.config;
  char buffer[160];
  std::snprintf(buffer, sizeof buffer, "block (%u,%u,%u) of grid (%u,%u,%u), %u threads", block_idx.x, block_idx.y,
                block_idx.z, c.grid.x, c.grid.y, c.grid.z, c.block.x * c.block.y * c.block.z);
  return std::string(c.where) + ", " + buffer;
}

void fiber_main() {
  machine.body(machine.body_context);
  machine.fibers[machine.current].state = State::kDone;
}  // returns to machine.scheduler through uc_link

void set_thread_index(int t) {
  const dim3& b = machine.config->block;
  thread_idx = {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
}

std::string thread_list(const std::vector<int>& threads) {
  std::string s;
  for (size_t i = 0; i < threads.size() && i < 8; ++i) s += (i ? "," : "") + std::to_string(threads[i]);
  if (threads.size() > 8) s += ",... (" + std::to_string(threads.size()) + " threads)";
  return s;
}

void run_block(int threads) {
  // 0x7fff is a NaN as a half and as a bfloat16, 0x7fff7fff one as a float.
  std::fill_n(reinterpret_cast<uint16_t*>(shared), (machine.config->shared_bytes + 1) / 2, 0x7fff);
  machine.block_first_epoch = ++machine.epoch;
  machine.epoch_start = "block start";
  if (static_cast<int>(machine.fibers.size()) < threads) machine.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = machine.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &machine.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.state = State::kReady;
  }
  ++machine.stats.blocks;
  machine.stats.threads += threads;
  for (;;) {
    for (int t = 0; t < threads; ++t) {
      if (machine.fibers[t].state != State::kReady) continue;
      machine.current = t;
      set_thread_index(t);
      swapcontext(&machine.scheduler, &machine.fibers[t].context);
    }
    machine.current = -1;
    std::vector<int> waiting, exited;
    for (int t = 0; t < threads; ++t) (machine.fibers[t].state == State::kDone ? exited : waiting).push_back(t);
    if (waiting.empty()) return;
    const Fiber& first = machine.fibers[waiting.front()];
    const std::string site = std::string(first.file) + ":" + std::to_string(first.line);
    std::vector<int> elsewhere;
    for (int t : waiting)
      if (machine.fibers[t].line != first.line || std::strcmp(machine.fibers[t].file, first.file) != 0)
        elsewhere.push_back(t);
    if (!exited.empty())
      report("barriers skipped", [&] {
        return where_in_grid() + ": threads " + thread_list(waiting) + " wait at __syncthreads() " + site +
               " but threads " + thread_list(exited) + " have exited without reaching it";
      });
    if (!elsewhere.empty())
      report("divergent barriers", [&] {
        return where_in_grid() + ": threads wait at different __syncthreads() calls: " + site + " and, for threads " +
               thread_list(elsewhere) + ", " + machine.fibers[elsewhere.front()].file + ":" +
               std::to_string(machine.fibers[elsewhere.front()].line);
      });
    ++machine.epoch;
    ++machine.stats.barriers;
    machine.epoch_start = "__syncthreads() " + site;
    for (int t : waiting) machine.fibers[t].state = State::kReady;
  }
}

const char* error_name(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}

void shared_access(uintptr_t address, size_t size, bool write) {
  const uintptr_t offset = address - reinterpret_cast<uintptr_t>(shared);
  const Machine& m = machine;
  if (m.current < 0) return;
  const char* what = write ? "writes" : "reads";
  if (offset + size > m.config->shared_bytes) {  // also catches offsets below the start (wrapped around)
    report("shared-memory accesses out of bounds", [&] {
      char buffer[200];
      std::snprintf(buffer, sizeof buffer, ": thread %d %s %zu bytes at shared-memory offset %lld, outside the %zu "
                    "bytes the launch gave", m.current, what, size,
                    static_cast<long long>(static_cast<intptr_t>(offset)), m.config->shared_bytes);
      return where_in_grid() + buffer;
    });
    return;
  }
  ++machine.stats.shared_accesses;
  const int t = m.current;
  for (size_t c = offset / kCell; c < (offset + size + kCell - 1) / kCell; ++c) {
    Cell& cell = shadow[c];
    const Cell before = cell;
    bool race = false;
    if (write) {
      race = (before.write_epoch == m.epoch && before.writer != t) ||
             (before.read_epoch == m.epoch && before.reader != t);
      cell.write_epoch = m.epoch;
      cell.writer = t;
    } else {
      race = before.write_epoch == m.epoch && before.writer != t;
      if (before.write_epoch < m.block_first_epoch && before.poison_reported != m.block_first_epoch) {
        cell.poison_reported = m.block_first_epoch;  // once per word and block
        report("reads of never-written shared memory", [&] {
          return where_in_grid() + ": thread " + std::to_string(t) + " reads shared-memory byte " +
                 std::to_string(c * kCell) + ", which nothing wrote since the block started (NaN poison)";
        });
      }
      if (cell.read_epoch != m.epoch)
        cell.read_epoch = m.epoch, cell.reader = t;
      else if (cell.reader != t)
        cell.reader = kManyReaders;
    }
    if (race)
      report("shared-memory races", [&] {
        const bool by_writer = before.write_epoch == m.epoch && before.writer != t;
        const std::string other =
            by_writer ? "was written by thread " + std::to_string(before.writer)
            : before.reader == kManyReaders ? std::string("was read by several threads")
                                            : "was read by thread " + std::to_string(before.reader);
        return where_in_grid() + ": shared-memory race: thread " + std::to_string(t) + " " + what + " byte " +
               std::to_string(c * kCell) + ", which " + other + " since " + m.epoch_start +
               " with no __syncthreads() in between";
      });
  }
}

void memory_access(void* address, size_t size, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a - reinterpret_cast<uintptr_t>(arena) < sizeof arena) shared_access(a, size, write);
}

}  // namespace

void* dynamic_shared_base() { return shared; }

void syncthreads(const char* file, int line) {
  Fiber& f = machine.fibers[machine.current];
  f.state = State::kAtBarrier;
  f.file = file;
  f.line = line;
  swapcontext(&f.context, &machine.scheduler);
}

cudaError_t set_max_dynamic_shared(const void* kernel, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > kOptinDynamicShared)
    return machine.last_error = cudaErrorInvalidValue;
  machine.max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

void run_grid(const void* kernel, const LaunchConfig& config, void (*body)(void*), void* context) {
  const dim3 &g = config.grid, &b = config.block;
  const unsigned long threads = static_cast<unsigned long>(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || threads == 0 ||
      threads > kMaxThreadsPerBlock || b.z > 64) {
    machine.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto raised = machine.max_dynamic_shared.find(kernel);
  const size_t limit = raised == machine.max_dynamic_shared.end() ? kDefaultDynamicShared : raised->second;
  if (config.shared_bytes > limit) {
    machine.last_error = cudaErrorInvalidValue;
    return;
  }
  ++machine.stats.launches;
  if (config.shared_bytes > kDefaultDynamicShared) ++machine.stats.optin_launches;
  machine.config = &config;
  machine.body = body;
  machine.body_context = context;
  grid_dim = g;
  block_dim = b;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        block_idx = {x, y, z};
        run_block(static_cast<int>(threads));
      }
  machine.config = nullptr;
}

}  // namespace emu

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device != 0)
    return emu::machine.last_error = cudaErrorInvalidValue;
  *value = static_cast<int>(emu::kOptinDynamicShared);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::machine.last_error;
  emu::machine.last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) { return emu::error_name(err); }

// ------------------------------------------------------------------------------------------------
// Hooks the -fsanitize=thread instrumentation of the kernel files calls.

#define EMU_ACCESS_HOOKS(n)                                                                      \
  EMU_EXPORT void __tsan_read##n(void* p) { emu::memory_access(p, n, false); }                   \
  EMU_EXPORT void __tsan_write##n(void* p) { emu::memory_access(p, n, true); }                   \
  EMU_EXPORT void __tsan_unaligned_read##n(void* p) { emu::memory_access(p, n, false); }         \
  EMU_EXPORT void __tsan_unaligned_write##n(void* p) { emu::memory_access(p, n, true); }         \
  EMU_EXPORT void __tsan_volatile_read##n(void* p) { emu::memory_access(p, n, false); }          \
  EMU_EXPORT void __tsan_volatile_write##n(void* p) { emu::memory_access(p, n, true); }          \
  EMU_EXPORT void __tsan_unaligned_volatile_read##n(void* p) { emu::memory_access(p, n, false); } \
  EMU_EXPORT void __tsan_unaligned_volatile_write##n(void* p) { emu::memory_access(p, n, true); }
EMU_ACCESS_HOOKS(1)
EMU_ACCESS_HOOKS(2)
EMU_ACCESS_HOOKS(4)
EMU_ACCESS_HOOKS(8)
EMU_ACCESS_HOOKS(16)
EMU_EXPORT void __tsan_read_range(void* p, size_t n) { emu::memory_access(p, n, false); }
EMU_EXPORT void __tsan_write_range(void* p, size_t n) { emu::memory_access(p, n, true); }
EMU_EXPORT void __tsan_init() {}
EMU_EXPORT void __tsan_func_entry(void*) {}
EMU_EXPORT void __tsan_func_exit() {}
EMU_EXPORT void __tsan_vptr_update(void**, void*) {}
EMU_EXPORT void __tsan_vptr_read(void**) {}

// ------------------------------------------------------------------------------------------------
// Entry points: the four host launchers of csrc/cuda (launch.h), run as written. Each returns the
// launcher's error message and every error the emulation reported, one per line ("" on success).

namespace {

std::string result;

template <typename F>
const char* call(F&& f) {
  std::lock_guard<std::mutex> lock(emu::entry_mutex);
  emu::machine.errors.clear();
  result = f();
  for (const auto& [kind, found] : emu::machine.errors) {
    const auto& [count, messages] = found;
    result += (result.empty() ? "" : "\n") + std::to_string(count) + " " + kind + ", the first " +
              std::to_string(messages.size()) + ":";
    for (const std::string& m : messages) result += "\n  " + m;
  }
  return result.c_str();
}

rlr::cuda::DType dtype_of(int dtype) { return static_cast<rlr::cuda::DType>(dtype); }

}  // namespace

EMU_EXPORT const char* rlr_emu_local_forward(int dtype, const rlr::cuda::Dims* dims, const void* q, const void* k,
                                             const void* v, void* out, float* lse) {
  return call([&] { return rlr::cuda::local_forward(dtype_of(dtype), *dims, q, k, v, out, lse, nullptr); });
}

EMU_EXPORT const char* rlr_emu_local_backward(int dtype, const rlr::cuda::Dims* dims, const void* q, const void* k,
                                              const void* v, const float* lse, const void* grad_out, void* dq,
                                              void* dk, void* dv, float* D) {
  return call([&] {
    return rlr::cuda::local_backward(dtype_of(dtype), *dims, q, k, v, lse, grad_out, dq, dk, dv, D, nullptr);
  });
}

EMU_EXPORT const char* rlr_emu_masked_forward(int dtype, const rlr::cuda::Dims* dims, const void* q, const void* k,
                                              const void* v, void* out, float* lse) {
  return call([&] { return rlr::cuda::masked_forward(dtype_of(dtype), *dims, q, k, v, out, lse, nullptr); });
}

EMU_EXPORT const char* rlr_emu_masked_backward(int dtype, const rlr::cuda::Dims* dims, const void* q, const void* k,
                                               const void* v, const void* out, const float* lse,
                                               const void* grad_out, void* dq, void* dk, void* dv, float* D,
                                               float* dk_partial) {
  return call([&] {
    return rlr::cuda::masked_backward(dtype_of(dtype), *dims, q, k, v, out, lse, grad_out, dq, dk, dv, D, dk_partial,
                                      nullptr);
  });
}

// Counters since the library was loaded: launches, launches above 48 KB of shared memory (the
// opt-in path), blocks, threads, barriers opened, shared-memory accesses checked.
EMU_EXPORT void rlr_emu_stats(long* out) {
  const emu::Stats& s = emu::machine.stats;
  const long values[] = {s.launches, s.optin_launches, s.blocks, s.threads, s.barriers, s.shared_accesses};
  std::copy(std::begin(values), std::end(values), out);
}

// The stand-in conversions, so that the test can compare them with torch's on every bit pattern.
EMU_EXPORT void rlr_emu_float_to_half(const float* x, uint16_t* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __float2half_rn(x[i]).bits;
}
EMU_EXPORT void rlr_emu_float_to_bfloat16(const float* x, uint16_t* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(x[i]).bits;
}
EMU_EXPORT void rlr_emu_half_to_float(const uint16_t* x, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __half2float(__half{x[i]});
}
EMU_EXPORT void rlr_emu_bfloat16_to_float(const uint16_t* x, float* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{x[i]});
}
