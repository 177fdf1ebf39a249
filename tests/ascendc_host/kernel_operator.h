// Host functional model of the Ascend C kernel API: a stand-in for CANN's kernel_operator.h that lets
// the kernels in ascendc_kernels/ compile unchanged with g++ and run on the CPU, one block index at a
// time. It is not CANN's CPU debug library and says nothing about timing; it models what a kernel can
// get wrong in its data movement and buffer use, and fails loudly where the hardware would corrupt
// data silently, hang or fault.
//
// Only the subset the kernels use is here, with the signatures of the Ascend C documentation (CANN
// asc-devkit, basic_api). Checked on every call, each failure throws ascendc_host::Violation:
//   - unified buffer (UB): 192 KiB per AIV core (TOTAL_UB_SIZE for dav-c220, the ascend910b and
//     ascend910_93 family); TPipe::InitBuffer rounds lengths up to 32 bytes, as the API does, and
//     refuses an allocation past the end, more than 8 queue buffers at one TPosition or 64 in all;
//   - DataCopy GM<->UB: UB address 32-byte aligned and count * sizeof(T) a whole number of 32-byte
//     blocks (the hardware would round the length down and drop the tail); GM -> VECIN, VECOUT -> GM;
//   - DataCopyPad: UB address 32-byte aligned, blockLen a multiple of sizeof(T), blockCount <= 4095,
//     blockLen <= 2097151, paddings <= 32 bytes; the model writes poison where the hardware writes
//     dummy data, so a kernel that reads padding reads garbage here too;
//   - every GM access inside the extent given to GlobalTensor::SetGlobalBuffer, and that extent inside
//     memory the launcher registered; every UB operand inside its tensor and 32-byte aligned;
//   - vector operands either identical or disjoint (Gather: dst disjoint from src, count at most the
//     source's elements); Gather offsets
//     aligned to sizeof(T) and inside the source tensor;
//   - queues: AllocTensor with every buffer in use (a hang on the NPU), EnQue past the depth, DeQue of
//     an empty queue, FreeTensor of a buffer the kernel does not hold;
//   - the kernel declares itself vector-only, since the launcher gives it one block per AIV core.
// UB starts each core filled with poison, so a kernel that reads what it never wrote sees garbage.
// Integer lanes wrap at 32 bits like the vector ALU; float lanes round like IEEE single precision.
// The model counts the bytes each launch moves between GM and UB (ascendc_host::Device).
#ifndef EXPERTWEAVE_ASCENDC_HOST_KERNEL_OPERATOR_H
#define EXPERTWEAVE_ASCENDC_HOST_KERNEL_OPERATOR_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*
#define KERNEL_TASK_TYPE_DEFAULT(type) ::ascendc_host::DeclareKernelType(type)

enum KernelMetaType { KERNEL_TYPE_AIV_ONLY };

namespace AscendC {

enum class TPosition : uint8_t { VECIN, VECOUT, VECCALC };

enum class RoundMode { CAST_NONE, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC };

}  // namespace AscendC

namespace ascendc_host {

constexpr uint32_t kUbBytes = 192 * 1024;
constexpr uint32_t kBlockBytes = 32;
constexpr uint32_t kMaxQueBuffersPerPosition = 8;
constexpr uint32_t kMaxBuffers = 64;
constexpr uint32_t kMaxBlockCount = 4095;
constexpr uint32_t kMaxBlockLen = 2097151;
constexpr uint8_t kPoison = 0xA5;

class Violation : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

[[noreturn]] inline void Fail(const std::string& api, const std::string& problem)
{
    throw Violation(api + ": " + problem);
}

inline uint64_t AlignUp(uint64_t bytes, uint64_t to) { return (bytes + to - 1) / to * to; }

// One launch: the GM allocations the launcher registered, the GM traffic, and the core running now.
struct Device {
    struct Allocation {
        uintptr_t begin;
        uint64_t bytes;
    };
    std::vector<Allocation> gm;
    uint64_t gmBytesRead = 0;
    uint64_t gmBytesWritten = 0;
    int64_t blockIdx = -1;
    int64_t blockNum = 0;
    bool declaredVectorOnly = false;
    std::vector<uint8_t> ub;
};

inline Device& device()
{
    static Device instance;
    return instance;
}

inline void ResetDevice() { device() = Device{}; }

inline void RegisterGm(const void* begin, uint64_t bytes)
{
    device().gm.push_back({reinterpret_cast<uintptr_t>(begin), bytes});
}

inline void DeclareKernelType(KernelMetaType type) { device().declaredVectorOnly = type == KERNEL_TYPE_AIV_ONLY; }

// Runs kernel() as block blockIdx of blockNum, on a core whose UB is all poison.
template <typename Kernel>
void RunCore(int64_t blockIdx, int64_t blockNum, Kernel&& kernel)
{
    Device& d = device();
    d.blockIdx = blockIdx;
    d.blockNum = blockNum;
    d.declaredVectorOnly = false;
    d.ub.assign(kUbBytes, kPoison);
    kernel();
    d.blockIdx = -1;
    if (!d.declaredVectorOnly) {
        Fail("launch", "the kernel does not declare KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY), "
                       "but is launched with one block per vector core");
    }
}

inline uint8_t* Ub(uint32_t offset) { return device().ub.data() + offset; }

inline const char* PositionName(AscendC::TPosition p)
{
    using AscendC::TPosition;
    return p == TPosition::VECIN ? "VECIN" : p == TPosition::VECOUT ? "VECOUT" : "VECCALC";
}

}  // namespace ascendc_host

namespace AscendC {

inline int64_t GetBlockIdx() { return ascendc_host::device().blockIdx; }

inline int64_t GetBlockNum() { return ascendc_host::device().blockNum; }

// A view of UB. The public data members and Load/Store/Bytes are the model's, not Ascend C API.
template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(TPosition position, uint32_t offset, uint32_t size)
        : position_(position), offset_(offset), size_(size), allocated_(true)
    {}

    template <typename U>
    LocalTensor<U> ReinterpretCast() const
    {
        LocalTensor<U> view(position_, offset_, static_cast<uint32_t>(uint64_t(size_) * sizeof(T) / sizeof(U)));
        view.allocated_ = allocated_;
        return view;
    }

    T Load(uint32_t i) const
    {
        T value;
        std::memcpy(&value, ascendc_host::Ub(offset_ + i * uint32_t(sizeof(T))), sizeof(T));
        return value;
    }

    void Store(uint32_t i, T value) const
    {
        std::memcpy(ascendc_host::Ub(offset_ + i * uint32_t(sizeof(T))), &value, sizeof(T));
    }

    uint64_t Bytes() const { return uint64_t(size_) * sizeof(T); }

    TPosition position_ = TPosition::VECCALC;
    uint32_t offset_ = 0;
    uint32_t size_ = 0;
    bool allocated_ = false;
};

// A view of GM. The public data members are the model's, not Ascend C API.
template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize)
    {
        const uintptr_t begin = reinterpret_cast<uintptr_t>(buffer);
        const uint64_t bytes = bufferSize * sizeof(T);
        bool inside = bytes == 0;
        for (const auto& a : ascendc_host::device().gm) {
            inside = inside || (begin >= a.begin && begin + bytes <= a.begin + a.bytes);
        }
        if (!inside) {
            ascendc_host::Fail("GlobalTensor::SetGlobalBuffer",
                               std::to_string(bytes) + " bytes are not inside any GM allocation of the launch");
        }
        if (begin % sizeof(T) != 0) {
            ascendc_host::Fail("GlobalTensor::SetGlobalBuffer", "address not aligned to sizeof(T)");
        }
        buffer_ = buffer;
        size_ = bufferSize;
    }

    GlobalTensor operator[](uint64_t offset) const
    {
        if (offset > size_) {
            ascendc_host::Fail("GlobalTensor::operator[]",
                               "offset " + std::to_string(offset) + " past the end (" + std::to_string(size_) + ")");
        }
        GlobalTensor view;
        view.buffer_ = buffer_ + offset;
        view.size_ = size_ - offset;
        return view;
    }

    T* buffer_ = nullptr;
    uint64_t size_ = 0;
};

}  // namespace AscendC

namespace ascendc_host {

template <typename T>
void RequireUb(const char* api, const char* name, const AscendC::LocalTensor<T>& t, uint64_t count)
{
    if (!t.allocated_) {
        Fail(api, std::string(name) + " is not a tensor of any queue or buffer");
    }
    if (t.offset_ % kBlockBytes != 0) {
        Fail(api, std::string(name) + " UB address " + std::to_string(t.offset_) + " is not 32-byte aligned");
    }
    if (count > t.size_) {
        Fail(api, std::string(name) + ": " + std::to_string(count) + " elements, the tensor holds " +
                      std::to_string(t.size_));
    }
}

template <typename T>
void RequireGm(const char* api, const AscendC::GlobalTensor<T>& g, uint64_t bytes)
{
    if (bytes > g.size_ * sizeof(T)) {
        Fail(api, std::to_string(bytes) + " GM bytes, the tensor has " + std::to_string(g.size_ * sizeof(T)));
    }
}

inline void RequirePosition(const char* api, AscendC::TPosition actual, AscendC::TPosition a, AscendC::TPosition b)
{
    if (actual != a && actual != b) {
        Fail(api, std::string("UB tensor at TPosition ") + PositionName(actual) + ", this path takes " +
                      PositionName(a) + (a == b ? "" : std::string(" or ") + PositionName(b)));
    }
}

inline void RequireIdenticalOrDisjoint(const char* api, uint32_t aOffset, uint64_t aBytes, uint32_t bOffset,
                                       uint64_t bBytes)
{
    const bool disjoint = aOffset + aBytes <= bOffset || bOffset + bBytes <= aOffset;
    if (!disjoint && aOffset != bOffset) {
        Fail(api, "operands partially overlap in UB");
    }
}

template <typename D, typename S>
void RequireUnary(const char* api, const AscendC::LocalTensor<D>& dst, const AscendC::LocalTensor<S>& src,
                  uint64_t count)
{
    RequireUb(api, "dst", dst, count);
    RequireUb(api, "src", src, count);
    RequireIdenticalOrDisjoint(api, dst.offset_, count * sizeof(D), src.offset_, count * sizeof(S));
}

template <typename T>
constexpr bool kVectorArithmetic = std::is_same_v<T, int32_t> || std::is_same_v<T, float>;

template <typename T>
T Multiply(T a, T b)
{
    if constexpr (std::is_integral_v<T>) {
        return static_cast<T>(static_cast<uint32_t>(a) * static_cast<uint32_t>(b));
    } else {
        return a * b;
    }
}

template <typename T>
T Sum(T a, T b)
{
    if constexpr (std::is_integral_v<T>) {
        return static_cast<T>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
    } else {
        return a + b;
    }
}

template <typename T, typename F>
void Elementwise(const char* api, const AscendC::LocalTensor<T>& dst, const AscendC::LocalTensor<T>& src,
                 int32_t count, F f)
{
    static_assert(kVectorArithmetic<T>, "the model implements int32_t and float lanes");
    if (count < 0) {
        Fail(api, "negative count");
    }
    RequireUnary(api, dst, src, uint32_t(count));
    for (uint32_t i = 0; i < uint32_t(count); ++i) {
        dst.Store(i, f(src.Load(i)));
    }
}

}  // namespace ascendc_host

namespace AscendC {

template <TPosition pos, int32_t depth>
class TQue {
public:
    static_assert(depth >= 1, "TQue depth must be at least 1");

    template <typename T>
    LocalTensor<T> AllocTensor()
    {
        RequireInitialised("TQue::AllocTensor");
        for (uint32_t tried = 0; tried < num_; ++tried) {
            const uint32_t b = (next_ + tried) % num_;
            if (state_[b] == State::Free) {
                state_[b] = State::Allocated;
                next_ = (b + 1) % num_;
                return LocalTensor<T>(pos, base_ + b * len_, len_ / uint32_t(sizeof(T)));
            }
        }
        ascendc_host::Fail("TQue::AllocTensor", "all " + std::to_string(num_) +
                                                    " buffers of the queue are in use (the core would wait forever)");
    }

    template <typename T>
    bool EnQue(const LocalTensor<T>& tensor)
    {
        const uint32_t b = BufferOf("TQue::EnQue", tensor);
        if (state_[b] != State::Allocated) {
            ascendc_host::Fail("TQue::EnQue", "buffer was not allocated from this queue, or is already queued");
        }
        if (queued_.size() >= uint32_t(depth)) {
            ascendc_host::Fail("TQue::EnQue", "queue of depth " + std::to_string(depth) + " is full");
        }
        state_[b] = State::Queued;
        queued_.push_back(b);
        return true;
    }

    template <typename T>
    LocalTensor<T> DeQue()
    {
        RequireInitialised("TQue::DeQue");
        if (queued_.empty()) {
            ascendc_host::Fail("TQue::DeQue", "queue is empty (the core would wait forever)");
        }
        const uint32_t b = queued_.front();
        queued_.pop_front();
        state_[b] = State::Dequeued;
        return LocalTensor<T>(pos, base_ + b * len_, len_ / uint32_t(sizeof(T)));
    }

    template <typename T>
    void FreeTensor(LocalTensor<T>& tensor)
    {
        const uint32_t b = BufferOf("TQue::FreeTensor", tensor);
        if (state_[b] == State::Free || state_[b] == State::Queued) {
            ascendc_host::Fail("TQue::FreeTensor", "buffer is not held by the kernel (free, or still queued)");
        }
        state_[b] = State::Free;
    }

    // Model: TPipe::InitBuffer hands the queue its buffers.
    static constexpr TPosition kPosition = pos;

    void Bind(uint32_t base, uint8_t num, uint32_t len)
    {
        if (num_ != 0) {
            ascendc_host::Fail("TPipe::InitBuffer", "queue initialised twice");
        }
        base_ = base;
        num_ = num;
        len_ = len;
        state_.assign(num, State::Free);
    }

private:
    enum class State { Free, Allocated, Queued, Dequeued };

    void RequireInitialised(const char* api) const
    {
        if (num_ == 0) {
            ascendc_host::Fail(api, "queue has no buffers (TPipe::InitBuffer was not called)");
        }
    }

    template <typename T>
    uint32_t BufferOf(const char* api, const LocalTensor<T>& tensor) const
    {
        RequireInitialised(api);
        const uint32_t offset = tensor.offset_;
        if (!tensor.allocated_ || offset < base_ || (offset - base_) % len_ != 0 || (offset - base_) / len_ >= num_) {
            ascendc_host::Fail(api, "tensor does not belong to this queue");
        }
        return (offset - base_) / len_;
    }

    uint32_t base_ = 0;
    uint32_t len_ = 0;
    uint32_t num_ = 0;
    uint32_t next_ = 0;
    std::vector<State> state_;
    std::deque<uint32_t> queued_;
};

template <TPosition pos = TPosition::VECCALC>
class TBuf {
public:
    template <typename T>
    LocalTensor<T> Get()
    {
        if (len_ == 0) {
            ascendc_host::Fail("TBuf::Get", "buffer has no memory (TPipe::InitBuffer was not called)");
        }
        return LocalTensor<T>(pos, base_, len_ / uint32_t(sizeof(T)));
    }

    // Model: TPipe::InitBuffer hands the buffer its memory.
    void Bind(uint32_t base, uint32_t len)
    {
        if (len_ != 0) {
            ascendc_host::Fail("TPipe::InitBuffer", "buffer initialised twice");
        }
        base_ = base;
        len_ = len;
    }

private:
    uint32_t base_ = 0;
    uint32_t len_ = 0;
};

class TPipe {
public:
    template <class Queue>
    bool InitBuffer(Queue& que, uint8_t num, uint32_t len)
    {
        const uint32_t aligned = Reserve(num, len);
        const uint8_t p = static_cast<uint8_t>(Queue::kPosition);
        queBuffers_[p] += num;
        if (queBuffers_[p] > ascendc_host::kMaxQueBuffersPerPosition) {
            ascendc_host::Fail("TPipe::InitBuffer", std::string("more than 8 queue buffers at TPosition ") +
                                                        ascendc_host::PositionName(Queue::kPosition));
        }
        que.Bind(used_ - num * aligned, num, aligned);
        return true;
    }

    template <TPosition pos>
    bool InitBuffer(TBuf<pos>& buf, uint32_t len)
    {
        const uint32_t aligned = Reserve(1, len);
        buf.Bind(used_ - aligned, aligned);
        return true;
    }

private:
    uint32_t Reserve(uint8_t num, uint32_t len)
    {
        if (num == 0 || len == 0) {
            ascendc_host::Fail("TPipe::InitBuffer", "empty buffer");
        }
        const uint64_t aligned = ascendc_host::AlignUp(len, ascendc_host::kBlockBytes);
        const uint64_t end = used_ + num * aligned;
        if (end > ascendc_host::kUbBytes) {
            ascendc_host::Fail("TPipe::InitBuffer", std::to_string(num * aligned) + " more bytes with " +
                                                        std::to_string(used_) + " in use exceed the " +
                                                        std::to_string(ascendc_host::kUbBytes) +
                                                        "-byte unified buffer");
        }
        buffers_ += num;
        if (buffers_ > ascendc_host::kMaxBuffers) {
            ascendc_host::Fail("TPipe::InitBuffer", "more than 64 buffers in one kernel");
        }
        used_ = static_cast<uint32_t>(end);
        return static_cast<uint32_t>(aligned);
    }

    uint32_t used_ = 0;
    uint32_t buffers_ = 0;
    uint32_t queBuffers_[3] = {0, 0, 0};
};

struct DataCopyExtParams {
    DataCopyExtParams() {}
    DataCopyExtParams(const uint16_t count, const uint32_t len, const uint32_t srcStrideIn, const uint32_t dstStrideIn,
                      const uint32_t rsvIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn)
    {}

    uint16_t blockCount = 1;
    uint32_t blockLen = 0;
    uint32_t srcStride = 0;
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams() {}
    DataCopyPadExtParams(const bool isPadValue, const uint8_t leftPadValue, const uint8_t rightPadValue, T padValue)
        : isPad(isPadValue), leftPadding(leftPadValue), rightPadding(rightPadValue), paddingValue(padValue)
    {}

    bool isPad = false;
    uint8_t leftPadding = 0;
    uint8_t rightPadding = 0;
    T paddingValue = 0;
};

}  // namespace AscendC

namespace ascendc_host {

inline void RequireBlocks(const char* api, const AscendC::DataCopyExtParams& p, size_t elementBytes)
{
    if (p.blockCount > kMaxBlockCount || p.blockLen > kMaxBlockLen) {
        Fail(api, "blockCount or blockLen out of range");
    }
    if (p.blockLen % elementBytes != 0) {
        Fail(api, "blockLen " + std::to_string(p.blockLen) + " is not a multiple of sizeof(T)");
    }
}

}  // namespace ascendc_host

namespace AscendC {

template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const uint32_t count)
{
    const char* api = "DataCopy(GM->UB)";
    const uint64_t bytes = uint64_t(count) * sizeof(T);
    ascendc_host::RequirePosition(api, dst.position_, TPosition::VECIN, TPosition::VECIN);
    ascendc_host::RequireUb(api, "dst", dst, count);
    if (bytes % ascendc_host::kBlockBytes != 0) {
        ascendc_host::Fail(api, std::to_string(bytes) + " bytes is not a whole number of 32-byte blocks");
    }
    ascendc_host::RequireGm(api, src, bytes);
    std::memcpy(ascendc_host::Ub(dst.offset_), src.buffer_, bytes);
    ascendc_host::device().gmBytesRead += bytes;
}

template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const uint32_t count)
{
    const char* api = "DataCopy(UB->GM)";
    const uint64_t bytes = uint64_t(count) * sizeof(T);
    ascendc_host::RequirePosition(api, src.position_, TPosition::VECOUT, TPosition::VECOUT);
    ascendc_host::RequireUb(api, "src", src, count);
    if (bytes % ascendc_host::kBlockBytes != 0) {
        ascendc_host::Fail(api, std::to_string(bytes) + " bytes is not a whole number of 32-byte blocks");
    }
    ascendc_host::RequireGm(api, dst, bytes);
    std::memcpy(dst.buffer_, ascendc_host::Ub(src.offset_), bytes);
    ascendc_host::device().gmBytesWritten += bytes;
}

template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& dataCopyParams,
                 const DataCopyPadExtParams<T>& padParams)
{
    const char* api = "DataCopyPad(GM->UB)";
    const DataCopyExtParams& p = dataCopyParams;
    ascendc_host::RequirePosition(api, dst.position_, TPosition::VECIN, TPosition::VECOUT);
    ascendc_host::RequireUb(api, "dst", dst, 0);
    ascendc_host::RequireBlocks(api, p, sizeof(T));
    if (p.blockCount == 0 || p.blockLen == 0) {
        return;
    }
    const uint64_t left = padParams.leftPadding * sizeof(T);
    const uint64_t right = padParams.rightPadding * sizeof(T);
    if (left > ascendc_host::kBlockBytes || right > ascendc_host::kBlockBytes) {
        ascendc_host::Fail(api, "padding wider than 32 bytes");
    }
    const uint64_t ubBlock = ascendc_host::AlignUp(left + p.blockLen + right, ascendc_host::kBlockBytes);
    const uint64_t ubPitch = ubBlock + uint64_t(p.dstStride) * ascendc_host::kBlockBytes;
    const uint64_t gmPitch = uint64_t(p.blockLen) + p.srcStride;
    ascendc_host::RequireUb(api, "dst", dst, ((p.blockCount - 1) * ubPitch + ubBlock) / sizeof(T));
    ascendc_host::RequireGm(api, src, (p.blockCount - 1) * gmPitch + p.blockLen);
    const uint8_t* gm = reinterpret_cast<const uint8_t*>(src.buffer_);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        uint8_t* block = ascendc_host::Ub(dst.offset_ + static_cast<uint32_t>(b * ubPitch));
        std::memset(block, ascendc_host::kPoison, ubBlock);
        for (uint32_t i = 0; padParams.isPad && i < padParams.leftPadding; ++i) {
            std::memcpy(block + i * sizeof(T), &padParams.paddingValue, sizeof(T));
        }
        for (uint32_t i = 0; padParams.isPad && i < padParams.rightPadding; ++i) {
            std::memcpy(block + left + p.blockLen + i * sizeof(T), &padParams.paddingValue, sizeof(T));
        }
        std::memcpy(block + left, gm + b * gmPitch, p.blockLen);
    }
    ascendc_host::device().gmBytesRead += uint64_t(p.blockCount) * p.blockLen;
}

template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& dataCopyParams)
{
    const char* api = "DataCopyPad(UB->GM)";
    const DataCopyExtParams& p = dataCopyParams;
    ascendc_host::RequirePosition(api, src.position_, TPosition::VECIN, TPosition::VECOUT);
    ascendc_host::RequireUb(api, "src", src, 0);
    ascendc_host::RequireBlocks(api, p, sizeof(T));
    if (p.blockCount == 0 || p.blockLen == 0) {
        return;
    }
    const uint64_t ubBlock = ascendc_host::AlignUp(p.blockLen, ascendc_host::kBlockBytes);
    const uint64_t ubPitch = ubBlock + uint64_t(p.srcStride) * ascendc_host::kBlockBytes;
    const uint64_t gmPitch = uint64_t(p.blockLen) + p.dstStride;
    ascendc_host::RequireUb(api, "src", src, ((p.blockCount - 1) * ubPitch + ubBlock) / sizeof(T));
    ascendc_host::RequireGm(api, dst, (p.blockCount - 1) * gmPitch + p.blockLen);
    uint8_t* gm = reinterpret_cast<uint8_t*>(dst.buffer_);
    for (uint32_t b = 0; b < p.blockCount; ++b) {
        std::memcpy(gm + b * gmPitch, ascendc_host::Ub(src.offset_ + static_cast<uint32_t>(b * ubPitch)), p.blockLen);
    }
    ascendc_host::device().gmBytesWritten += uint64_t(p.blockCount) * p.blockLen;
}

template <typename T>
void Gather(const LocalTensor<T>& dst, const LocalTensor<T>& src, const LocalTensor<uint32_t>& srcOffset,
            const uint32_t srcBaseAddr, const uint32_t count)
{
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "Gather on dav-c220 takes 16- and 32-bit elements");
    const char* api = "Gather";
    ascendc_host::RequireUb(api, "dst", dst, count);
    // CANN's Gather documentation: count may not exceed the source tensor's element count.
    ascendc_host::RequireUb(api, "src", src, count);
    ascendc_host::RequireUb(api, "srcOffset", srcOffset, count);
    const uint64_t dstBytes = uint64_t(count) * sizeof(T);
    if (!(dst.offset_ + dstBytes <= src.offset_ || src.offset_ + src.Bytes() <= dst.offset_)) {
        ascendc_host::Fail(api, "dst overlaps src");
    }
    ascendc_host::RequireIdenticalOrDisjoint(api, dst.offset_, dstBytes, srcOffset.offset_, uint64_t(count) * 4);
    std::vector<T> gathered(count);
    for (uint32_t i = 0; i < count; ++i) {
        const uint64_t at = uint64_t(srcBaseAddr) + srcOffset.Load(i);
        if (at % sizeof(T) != 0 || at + sizeof(T) > src.Bytes()) {
            ascendc_host::Fail(api, "offset " + std::to_string(at) + " of element " + std::to_string(i) +
                                        " is misaligned or outside the " + std::to_string(src.Bytes()) +
                                        "-byte source");
        }
        gathered[i] = src.Load(static_cast<uint32_t>(at / sizeof(T)));
    }
    for (uint32_t i = 0; i < count; ++i) {
        dst.Store(i, gathered[i]);
    }
}

template <typename T>
void Muls(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, const int32_t& count)
{
    ascendc_host::Elementwise("Muls", dst, src, count, [&](T x) { return ascendc_host::Multiply(x, scalarValue); });
}

template <typename T>
void Maxs(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, const int32_t& count)
{
    ascendc_host::Elementwise("Maxs", dst, src, count, [&](T x) { return x > scalarValue ? x : scalarValue; });
}

template <typename T>
void Mins(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue, const int32_t& count)
{
    ascendc_host::Elementwise("Mins", dst, src, count, [&](T x) { return x < scalarValue ? x : scalarValue; });
}

template <typename T>
void Add(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1, const int32_t& count)
{
    static_assert(ascendc_host::kVectorArithmetic<T>, "the model implements int32_t and float lanes");
    const char* api = "Add";
    if (count < 0) {
        ascendc_host::Fail(api, "negative count");
    }
    ascendc_host::RequireUnary(api, dst, src0, uint32_t(count));
    ascendc_host::RequireUnary(api, dst, src1, uint32_t(count));
    for (uint32_t i = 0; i < uint32_t(count); ++i) {
        dst.Store(i, ascendc_host::Sum(src0.Load(i), src1.Load(i)));
    }
}

template <typename T>
void CreateVecIndex(LocalTensor<T> dst, const T& firstValue, uint32_t count)
{
    static_assert(ascendc_host::kVectorArithmetic<T>, "the model implements int32_t and float lanes");
    ascendc_host::RequireUb("CreateVecIndex", "dst", dst, count);
    for (uint32_t i = 0; i < count; ++i) {
        dst.Store(i, ascendc_host::Sum(firstValue, static_cast<T>(i)));
    }
}

template <typename D, typename S>
void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, const RoundMode& roundMode, const uint32_t count)
{
    static_assert(std::is_same_v<S, float> && std::is_same_v<D, int32_t>, "the model implements float -> int32_t");
    const char* api = "Cast";
    ascendc_host::RequireUnary(api, dst, src, count);
    for (uint32_t i = 0; i < count; ++i) {
        const float x = src.Load(i);
        float rounded = 0;
        switch (roundMode) {
            case RoundMode::CAST_FLOOR: rounded = std::floor(x); break;
            case RoundMode::CAST_CEIL: rounded = std::ceil(x); break;
            case RoundMode::CAST_TRUNC: rounded = std::trunc(x); break;
            case RoundMode::CAST_ROUND: rounded = std::round(x); break;
            case RoundMode::CAST_RINT: rounded = std::nearbyint(x); break;
            case RoundMode::CAST_NONE: ascendc_host::Fail(api, "float -> int32_t takes an explicit rounding mode");
        }
        dst.Store(i, static_cast<int32_t>(rounded));
    }
}

}  // namespace AscendC

#endif
