// Test-only fake "npu" device: a PrivateUse1 backend whose memory is ordinary host memory.
//
// What it provides (and nothing more):
//   * an allocator over CPU memory that counts live and peak bytes (per process), so the
//     device layer's peak-memory readings can be tested like a real accelerator's;
//   * a device guard (one device, index 0) and PrivateUse1 hooks, so autograd, torch.accelerator
//     and DataLoader see a well-formed backend;
//   * the handful of ATen kernels a backend must own itself (factories, views, resize, set_,
//     cross-device copies);
//   * a boxed fallback for every other operator: move the arguments to the CPU, run the CPU
//     kernel, move the results back. Each fallback call is counted per operator name.
//
// The operator library is loaded with torch.ops.load_library (no pybind); the counters are read
// through the small "fake_npu" op namespace defined at the bottom.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace npu_ft_fake {

constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;
constexpr c10::DeviceIndex kDeviceCount = 1;

// ----------------------------------------------------------------------------------------------
// State: availability switch, memory counters, fallback counters
// ----------------------------------------------------------------------------------------------
std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_allocated{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_alloc_calls{0};

std::mutex g_fallback_mutex;
std::map<std::string, int64_t> g_fallback_calls;

thread_local c10::DeviceIndex t_current_device = 0;

void raise_peak_to(int64_t now) {
  int64_t seen = g_peak.load();
  while (now > seen && !g_peak.compare_exchange_weak(seen, now)) {
  }
}

// ----------------------------------------------------------------------------------------------
// Allocator: every block carries its size in a 64-byte header in front of the user pointer, so
// the deleter can give the bytes back to the counter without a lookup table.
// ----------------------------------------------------------------------------------------------
constexpr size_t kHeaderBytes = 64;  // keeps the user pointer 64-byte aligned

void release_block(void* user_ptr) {
  if (user_ptr == nullptr) {
    return;
  }
  char* block = static_cast<char*>(user_ptr) - kHeaderBytes;
  size_t nbytes = 0;
  std::memcpy(&nbytes, block, sizeof(nbytes));
  g_allocated -= static_cast<int64_t>(nbytes);
  c10::free_cpu(block);
}

struct CountingHostAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    char* block = static_cast<char*>(c10::alloc_cpu(nbytes + kHeaderBytes));
    std::memcpy(block, &nbytes, sizeof(nbytes));
    void* user_ptr = block + kHeaderBytes;
    raise_peak_to(g_allocated += static_cast<int64_t>(nbytes));
    g_alloc_calls += 1;
    return {user_ptr, user_ptr, &release_block, c10::Device(kType, t_current_device)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &release_block;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingHostAllocator g_allocator;
REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_allocator);

// ----------------------------------------------------------------------------------------------
// Device guard: one device; streams and events are no-ops (all work is synchronous host code).
// ----------------------------------------------------------------------------------------------
struct FakeNpuGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override {
    return kType;
  }
  c10::Device exchangeDevice(c10::Device d) const override {
    c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override {
    return c10::Device(kType, t_current_device);
  }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kType, "fake npu guard got device ", d);
    if (d.has_index()) {
      TORCH_CHECK(d.index() < kDeviceCount, "fake npu: invalid device index ", int(d.index()),
                  " (", int(kDeviceCount), " device(s))");
      t_current_device = d.index();
    }
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.has_index() && d.index() < kDeviceCount) {
      t_current_device = d.index();
    }
  }
  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream exchangeStream(c10::Stream s) const override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  // Always 1, even while "disabled": the autograd engine sizes its device queues from this once.
  c10::DeviceIndex deviceCount() const noexcept override {
    return kDeviceCount;
  }
  void record(void**, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override {
    return true;
  }
  void destroyEvent(void*, const c10::DeviceIndex) const noexcept override {}
  bool queryStream(const c10::Stream&) const override {
    return true;
  }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, FakeNpuGuard);

// ----------------------------------------------------------------------------------------------
// Hooks: what torch.accelerator, pin_memory and generators ask of a PrivateUse1 backend.
// ----------------------------------------------------------------------------------------------
struct FakeNpuGenerator final : at::CPUGeneratorImpl {
  explicit FakeNpuGenerator(c10::DeviceIndex index) {
    device_ = c10::Device(kType, index);
    key_set_ = c10::DispatchKeySet(c10::DispatchKey::PrivateUse1);
  }
};

struct FakeNpuHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override {
    return true;
  }
  bool isAvailable() const override {
    return g_enabled.load();
  }
  bool hasPrimaryContext(c10::DeviceIndex) const override {
    return true;
  }
  c10::DeviceIndex deviceCount() const override {
    return kDeviceCount;
  }
  void setCurrentDevice(c10::DeviceIndex index) const override {
    FakeNpuGuard().setDevice(c10::Device(kType, index));
  }
  c10::DeviceIndex getCurrentDevice() const override {
    return t_current_device;
  }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex index) const override {
    c10::DeviceIndex old = t_current_device;
    setCurrentDevice(index);
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex index) const override {
    return exchangeDevice(index);
  }
  bool isPinnedPtr(const void*) const override {
    return false;
  }
  c10::Allocator* getPinnedMemoryAllocator() const override {
    return c10::GetCPUAllocator();  // host memory is all there is
  }
  c10::Device getDeviceFromPtr(void*) const override {
    return c10::Device(kType, t_current_device);
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    static at::Generator generator = at::make_generator<FakeNpuGenerator>(0);
    return generator;
  }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return at::make_generator<FakeNpuGenerator>(index < 0 ? 0 : index);
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), newsize);
  }
};

FakeNpuHooks g_hooks;

struct HooksRegistrar {
  HooksRegistrar() {
    at::RegisterPrivateUse1HooksInterface(&g_hooks);
  }
};
HooksRegistrar g_hooks_registrar;

// ----------------------------------------------------------------------------------------------
// The kernels a backend must own
// ----------------------------------------------------------------------------------------------
void check_factory_args(std::optional<c10::Layout> layout, std::optional<bool> pin_memory,
                        std::optional<c10::Device> device) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::Layout::Strided,
              "fake npu: only strided tensors are supported");
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory), "fake npu: pinned memory lives on the CPU");
  TORCH_CHECK(c10::device_or_default(device).type() == kType, "fake npu factory called for ",
              c10::device_or_default(device));
}

at::Tensor empty_memory_format(c10::IntArrayRef size, std::optional<c10::ScalarType> dtype,
                               std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                               std::optional<bool> pin_memory,
                               std::optional<c10::MemoryFormat> memory_format) {
  check_factory_args(layout, pin_memory, device);
  c10::DeviceGuard guard(c10::device_or_default(device));
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<c10::ScalarType> dtype,
                         std::optional<c10::Layout> layout, std::optional<c10::Device> device,
                         std::optional<bool> pin_memory) {
  check_factory_args(layout, pin_memory, device);
  c10::DeviceGuard guard(c10::device_or_default(device));
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// A CPU tensor that aliases (does not own) the memory of a fake-npu tensor, same geometry.
at::Tensor host_alias(const at::Tensor& t) {
  if (t.device().type() != kType) {
    return t;
  }
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(c10::kCPU));
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool /*non_blocking*/) {
  TORCH_CHECK(self.device().type() == kType || self.is_cpu(), "fake npu: cannot copy from ", self.device());
  TORCH_CHECK(dst.device().type() == kType || dst.is_cpu(), "fake npu: cannot copy to ", dst.device());
  if (dst.numel() == 0) {
    return dst;
  }
  at::Tensor dst_host = host_alias(dst);
  dst_host.copy_(host_alias(self));  // the CPU copy handles dtype casts, strides and broadcasting
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  if (dst.sizes() != self.sizes()) {
    if (dst.device().type() == kType) {
      at::native::resize_(dst, self.sizes(), std::nullopt);
    } else {
      dst.resize_(self.sizes());
    }
  }
  return copy_from(self, dst, false);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<c10::MemoryFormat> memory_format) {
  // the CPU implementation only touches the TensorImpl and reallocates through the storage's
  // own allocator (ours), so it serves host-backed memory as it is
  return at::native::resize_(self, size, memory_format);
}

at::Tensor& set_source_storage(at::Tensor& self, c10::Storage source) {
  return at::native::set_(self, std::move(source));
}

at::Tensor& set_source_storage_offset(at::Tensor& self, c10::Storage source, int64_t offset,
                                      c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, std::move(source), offset, size, stride);
}

at::Tensor& set_source_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

void boxed_cpu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  {
    const auto& name = op.schema().operator_name();
    std::string key = name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
    std::lock_guard<std::mutex> lock(g_fallback_mutex);
    g_fallback_calls[key] += 1;
  }
  at::native::cpu_fallback(op, stack, /*error_on_views=*/true);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", &empty_memory_format);
  m.impl("empty_strided", &empty_strided);
  m.impl("_copy_from", &copy_from);
  m.impl("_copy_from_and_resize", &copy_from_and_resize);
  m.impl("resize_", &resize_);
  m.impl("set_.source_Storage", &set_source_storage);
  m.impl("set_.source_Storage_storage_offset", &set_source_storage_offset);
  m.impl("set_.source_Tensor", &set_source_tensor);
  // view operators must alias the input's storage, so they cannot go through the CPU fallback;
  // the CPU versions only rewrite sizes/strides and work on any strided storage
  m.impl("as_strided", &at::native::as_strided_tensorimpl);
  m.impl("view", &at::native::view);
  m.impl("_reshape_alias", &at::native::_reshape_alias);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&boxed_cpu_fallback>());
}

// ----------------------------------------------------------------------------------------------
// Introspection for the Python side: torch.ops.npu_ft_fake_npu.*
// ----------------------------------------------------------------------------------------------
int64_t memory_allocated() {
  return g_allocated.load();
}
int64_t max_memory_allocated() {
  return g_peak.load();
}
int64_t allocation_calls() {
  return g_alloc_calls.load();
}
void reset_peak_memory_stats() {
  g_peak.store(g_allocated.load());
}
void set_enabled(bool enabled) {
  g_enabled.store(enabled);
}
bool is_enabled() {
  return g_enabled.load();
}
int64_t fallback_calls(const std::string& op) {
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  auto it = g_fallback_calls.find(op);
  return it == g_fallback_calls.end() ? 0 : it->second;
}
std::vector<std::string> fallback_ops() {
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  std::vector<std::string> names;
  for (const auto& kv : g_fallback_calls) {
    names.push_back(kv.first);
  }
  return names;
}
void reset_fallback_calls() {
  std::lock_guard<std::mutex> lock(g_fallback_mutex);
  g_fallback_calls.clear();
}

TORCH_LIBRARY(npu_ft_fake_npu, m) {
  m.def("memory_allocated() -> int", &memory_allocated);
  m.def("max_memory_allocated() -> int", &max_memory_allocated);
  m.def("allocation_calls() -> int", &allocation_calls);
  m.def("reset_peak_memory_stats() -> ()", &reset_peak_memory_stats);
  m.def("set_enabled(bool enabled) -> ()", &set_enabled);
  m.def("is_enabled() -> bool", &is_enabled);
  m.def("fallback_calls(str op) -> int", &fallback_calls);
  m.def("fallback_ops() -> str[]", &fallback_ops);
  m.def("reset_fallback_calls() -> ()", &reset_fallback_calls);
}

}  // namespace npu_ft_fake
