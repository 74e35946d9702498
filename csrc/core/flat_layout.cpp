#include "core/flat_layout.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace pyruntime {
namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

void check_numels(const std::vector<int64_t>& numels) {
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) {
      fail("numel of tensor " + std::to_string(i) + " must be >= 0, got " + std::to_string(numels[i]));
    }
  }
}

void check_positive(const char* name, int64_t value) {
  if (value < 1) fail(std::string(name) + " must be >= 1, got " + std::to_string(value));
}

// Sizes come from user input, so wrap-around is reported instead of silently producing a
// layout whose offsets alias.
int64_t checked_add(int64_t a, int64_t b) {
  if (a > kMax - b) fail("flat layout size overflows int64 (" + std::to_string(a) + " + " + std::to_string(b) + ")");
  return a + b;
}

int64_t round_up(int64_t x, int64_t multiple) {
  int64_t remainder = x % multiple;
  return remainder == 0 ? x : checked_add(x, multiple - remainder);
}

// End of the packed data (before the final padding) when `numels` are laid out from 0;
// fills `offsets` when given.
int64_t pack(const std::vector<int64_t>& numels, int64_t align, std::vector<int64_t>* offsets) {
  int64_t cursor = 0;
  for (int64_t numel : numels) {
    int64_t offset = round_up(cursor, align);
    if (offsets != nullptr) offsets->push_back(offset);
    cursor = checked_add(offset, numel);
  }
  return cursor;
}

}  // namespace

bool operator==(const ShardPiece& a, const ShardPiece& b) {
  return a.tensor_index == b.tensor_index && a.tensor_offset == b.tensor_offset &&
         a.shard_offset == b.shard_offset && a.numel == b.numel;
}

bool operator==(const Bucket& a, const Bucket& b) {
  return a.begin == b.begin && a.end == b.end && a.numel == b.numel;
}

FlatLayout::FlatLayout(std::vector<int64_t> numels, int64_t world_size, int64_t align)
    : numels_(std::move(numels)), world_size_(world_size), align_(align), total_numel_(0) {
  check_numels(numels_);
  check_positive("world_size", world_size_);
  check_positive("align", align_);
  if (world_size_ > kMax / align_) {
    fail("world_size * align overflows int64 (world_size " + std::to_string(world_size_) +
         ", align " + std::to_string(align_) + ")");
  }
  offsets_.reserve(numels_.size());
  int64_t end = pack(numels_, align_, &offsets_);
  total_numel_ = round_up(end, world_size_ * align_);
}

void FlatLayout::check_rank(int64_t rank) const {
  if (rank < 0 || rank >= world_size_) {
    fail("rank must be in [0, " + std::to_string(world_size_) + "), got " + std::to_string(rank));
  }
}

std::pair<int64_t, int64_t> FlatLayout::shard_range(int64_t rank) const {
  check_rank(rank);
  int64_t size = shard_numel();
  return {rank * size, (rank + 1) * size};
}

int64_t FlatLayout::first_tensor_ending_after(int64_t position) const {
  // Tensor ends are non-decreasing in index order, so this is a binary search; large models
  // have thousands of tensors and every rank asks for its pieces.
  int64_t lo = 0, hi = num_tensors();
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (offsets_[mid] + numels_[mid] <= position) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

std::vector<ShardPiece> FlatLayout::pieces(int64_t rank) const {
  auto [shard_begin, shard_end] = shard_range(rank);
  std::vector<ShardPiece> out;
  for (int64_t i = first_tensor_ending_after(shard_begin); i < num_tensors(); ++i) {
    if (offsets_[i] >= shard_end) break;
    int64_t begin = std::max(offsets_[i], shard_begin);
    int64_t end = std::min(offsets_[i] + numels_[i], shard_end);
    if (begin < end) out.push_back({i, begin - offsets_[i], begin - shard_begin, end - begin});
  }
  return out;
}

std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, int64_t bucket_bytes,
                                 int64_t element_size, int64_t align) {
  check_numels(numels);
  check_positive("bucket_bytes", bucket_bytes);
  check_positive("element_size", element_size);
  check_positive("align", align);
  // span * element_size <= bucket_bytes  <=>  span <= floor(bucket_bytes / element_size),
  // which cannot overflow.
  const int64_t cap = bucket_bytes / element_size;
  std::vector<Bucket> buckets;
  Bucket bucket{0, 0, 0};
  int64_t cursor = 0;  // end of the open bucket's packed data, before its final padding
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    int64_t grown = checked_add(round_up(cursor, align), numels[i]);
    if (bucket.end > bucket.begin && round_up(grown, align) > cap) {
      buckets.push_back(bucket);
      bucket = Bucket{i, i, 0};
      grown = numels[i];
    }
    cursor = grown;
    bucket.end = i + 1;
    bucket.numel = round_up(cursor, align);
  }
  if (bucket.end > bucket.begin) buckets.push_back(bucket);
  return buckets;
}

}  // namespace pyruntime
