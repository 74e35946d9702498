// Unit tests of the flat-buffer layout planner (csrc/core/flat_layout.h).
#include <cstdint>
#include <random>
#include <ostream>
#include <stdexcept>
#include <utility>
#include <vector>

#include "core/flat_layout.h"
#include "tests/check.h"

using pyruntime::Bucket;
using pyruntime::FlatLayout;
using pyruntime::ShardPiece;
using Numels = std::vector<int64_t>;

namespace pyruntime {
std::ostream& operator<<(std::ostream& os, const ShardPiece& p) {
  return os << "{tensor " << p.tensor_index << ", tensor_offset " << p.tensor_offset << ", shard_offset "
            << p.shard_offset << ", numel " << p.numel << "}";
}
std::ostream& operator<<(std::ostream& os, const Bucket& b) {
  return os << "{[" << b.begin << ", " << b.end << "), numel " << b.numel << "}";
}
}  // namespace pyruntime

template <typename A, typename B>
std::ostream& operator<<(std::ostream& os, const std::pair<A, B>& p) {
  return os << "(" << p.first << ", " << p.second << ")";
}

template <typename T>
std::ostream& operator<<(std::ostream& os, const std::vector<T>& v) {
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os << "]";
}

// Every invariant the planner promises, checked on one layout.
static void check_layout_invariants(const FlatLayout& layout) {
  const Numels& numels = layout.numels();
  const Numels& offsets = layout.offsets();
  const int64_t align = layout.align(), world = layout.world_size();
  CHECK_EQ(offsets.size(), numels.size());
  int64_t end = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    CHECK_EQ(offsets[i] % align, 0);
    CHECK(offsets[i] >= end);         // no overlap with the previous tensor
    CHECK(offsets[i] - end < align);  // and no more gap than alignment needs
    end = offsets[i] + numels[i];
  }
  const int64_t total = layout.total_numel();
  CHECK(total >= end);
  CHECK(total - end < world * align);
  CHECK_EQ(total % (world * align), 0);
  CHECK_EQ(layout.shard_numel() * world, total);
  CHECK_EQ(layout.shard_numel() % align, 0);
}

// Shards tile [0, total) in rank order, and the pieces of all ranks cover every element of
// every tensor exactly once, at matching flat positions.
static void check_shards_and_pieces(const FlatLayout& layout) {
  const Numels& numels = layout.numels();
  std::vector<std::vector<int>> covered(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) covered[i].assign(static_cast<size_t>(numels[i]), 0);
  int64_t expected_begin = 0;
  for (int64_t rank = 0; rank < layout.world_size(); ++rank) {
    auto [begin, end] = layout.shard_range(rank);
    CHECK_EQ(begin, expected_begin);
    CHECK_EQ(end - begin, layout.shard_numel());
    expected_begin = end;
    int64_t previous_shard_end = 0;
    for (const ShardPiece& p : layout.pieces(rank)) {
      CHECK(p.numel > 0);
      CHECK(p.shard_offset >= previous_shard_end);  // buffer order, disjoint
      CHECK(p.shard_offset + p.numel <= layout.shard_numel());
      CHECK(p.tensor_offset >= 0 && p.tensor_offset + p.numel <= numels[p.tensor_index]);
      CHECK_EQ(layout.offsets()[p.tensor_index] + p.tensor_offset, begin + p.shard_offset);
      previous_shard_end = p.shard_offset + p.numel;
      for (int64_t k = 0; k < p.numel; ++k) ++covered[p.tensor_index][p.tensor_offset + k];
    }
  }
  CHECK_EQ(expected_begin, layout.total_numel());
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int count : covered[i]) CHECK_EQ(count, 1);
  }
}

TEST(offsets_are_aligned_and_tight) {
  FlatLayout layout({5, 16, 1, 17}, 1, 16);
  CHECK_EQ(layout.offsets(), (Numels{0, 16, 32, 48}));
  CHECK_EQ(layout.total_numel(), 80);  // 48 + 17 = 65, padded to 80
  CHECK_EQ(layout.shard_numel(), 80);
  check_layout_invariants(layout);
}

TEST(align_one_packs_densely) {
  FlatLayout layout({3, 4, 5}, 1, 1);
  CHECK_EQ(layout.offsets(), (Numels{0, 3, 7}));
  CHECK_EQ(layout.total_numel(), 12);
}

TEST(total_padded_to_world_size_times_align) {
  FlatLayout layout({100}, 4, 8);  // 100 -> multiple of 32
  CHECK_EQ(layout.total_numel(), 128);
  CHECK_EQ(layout.shard_numel(), 32);
  CHECK_EQ(layout.shard_range(0), (std::pair<int64_t, int64_t>{0, 32}));
  CHECK_EQ(layout.shard_range(3), (std::pair<int64_t, int64_t>{96, 128}));
  check_layout_invariants(layout);
  check_shards_and_pieces(layout);
}

TEST(exact_fit_needs_no_padding) {
  FlatLayout layout({32, 32}, 4, 16);
  CHECK_EQ(layout.total_numel(), 64);
  CHECK_EQ(layout.shard_numel(), 16);
}

TEST(pieces_split_tensors_across_shards) {
  // offsets {0, 16}; total 48 = 3 shards of 16: [0,16) [16,32) [32,48)
  FlatLayout layout({10, 20}, 3, 16);
  CHECK_EQ(layout.total_numel(), 48);
  CHECK_EQ(layout.pieces(0), (std::vector<ShardPiece>{{0, 0, 0, 10}}));
  CHECK_EQ(layout.pieces(1), (std::vector<ShardPiece>{{1, 0, 0, 16}}));
  CHECK_EQ(layout.pieces(2), (std::vector<ShardPiece>{{1, 16, 0, 4}}));
  check_shards_and_pieces(layout);
}

TEST(one_tensor_spanning_many_shards) {
  FlatLayout layout({100}, 5, 4);  // total 100, shards of 20
  CHECK_EQ(layout.total_numel(), 100);
  for (int64_t rank = 0; rank < 5; ++rank) {
    CHECK_EQ(layout.pieces(rank), (std::vector<ShardPiece>{{0, 20 * rank, 0, 20}}));
  }
}

TEST(rank_with_only_padding_has_no_pieces) {
  FlatLayout layout({3}, 4, 2);  // total 8, shards of 2; data only in [0, 3)
  CHECK_EQ(layout.pieces(1), (std::vector<ShardPiece>{{0, 2, 0, 1}}));
  CHECK(layout.pieces(2).empty());
  CHECK(layout.pieces(3).empty());
  check_shards_and_pieces(layout);
}

TEST(empty_tensors) {
  FlatLayout layout({0, 5, 0, 0, 3, 0}, 2, 4);
  CHECK_EQ(layout.offsets(), (Numels{0, 0, 8, 8, 8, 12}));
  CHECK_EQ(layout.total_numel(), 16);
  check_layout_invariants(layout);
  check_shards_and_pieces(layout);
  for (int64_t rank = 0; rank < 2; ++rank) {
    for (const ShardPiece& p : layout.pieces(rank)) CHECK(p.numel > 0);
  }
}

TEST(no_tensors_or_only_empty_ones) {
  FlatLayout none({}, 4, 16);
  CHECK_EQ(none.total_numel(), 0);
  CHECK_EQ(none.shard_numel(), 0);
  CHECK(none.pieces(3).empty());
  FlatLayout empties({0, 0}, 2, 16);
  CHECK_EQ(empties.offsets(), (Numels{0, 0}));
  CHECK_EQ(empties.total_numel(), 0);
  check_shards_and_pieces(empties);
}

TEST(world_size_one_owns_everything) {
  FlatLayout layout({7, 9, 0, 33}, 1, 16);
  auto [begin, end] = layout.shard_range(0);
  CHECK_EQ(begin, 0);
  CHECK_EQ(end, layout.total_numel());
  std::vector<ShardPiece> expected{{0, 0, 0, 7}, {1, 0, 16, 9}, {3, 0, 32, 33}};
  CHECK_EQ(layout.pieces(0), expected);
}

TEST(random_layouts_keep_every_invariant) {
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int64_t> count(0, 12), numel(0, 70), world(1, 9), align_pick(0, 4);
  const int64_t aligns[] = {1, 2, 4, 16, 5};  // 5: non-power-of-two alignments work too
  for (int trial = 0; trial < 300; ++trial) {
    Numels numels(static_cast<size_t>(count(rng)));
    for (auto& n : numels) n = (rng() % 4 == 0) ? 0 : numel(rng);
    FlatLayout layout(numels, world(rng), aligns[align_pick(rng)]);
    check_layout_invariants(layout);
    check_shards_and_pieces(layout);
  }
}

TEST(invalid_layout_arguments_throw) {
  CHECK_THROWS_WITH((FlatLayout({4, -3}, 1, 16)), std::invalid_argument, "numel of tensor 1 must be >= 0, got -3");
  CHECK_THROWS_WITH((FlatLayout({4}, 0, 16)), std::invalid_argument, "world_size must be >= 1, got 0");
  CHECK_THROWS_WITH((FlatLayout({4}, 2, 0)), std::invalid_argument, "align must be >= 1, got 0");
  CHECK_THROWS_WITH((FlatLayout({4}, 2, -16)), std::invalid_argument, "got -16");
  FlatLayout layout({4}, 2, 16);
  CHECK_THROWS_WITH(layout.shard_range(2), std::invalid_argument, "rank must be in [0, 2), got 2");
  CHECK_THROWS_WITH(layout.pieces(-1), std::invalid_argument, "got -1");
}

TEST(overflowing_layouts_throw) {
  const int64_t huge = INT64_MAX - 3;
  CHECK_THROWS_WITH((FlatLayout({huge, huge}, 1, 1)), std::invalid_argument, "overflows int64");
  CHECK_THROWS_WITH((FlatLayout({huge}, 1, 16)), std::invalid_argument, "overflows int64");
  CHECK_THROWS_WITH((FlatLayout({1}, INT64_MAX / 2, 16)), std::invalid_argument, "overflows int64");
}

TEST(buckets_group_consecutive_tensors) {
  // 4-byte elements, 40-byte buckets = 10 elements
  auto buckets = pyruntime::plan_buckets({3, 4, 2, 5, 5, 1}, 40, 4);
  CHECK_EQ(buckets, (std::vector<Bucket>{{0, 3, 9}, {3, 5, 10}, {5, 6, 1}}));
}

TEST(oversized_tensor_gets_its_own_bucket) {
  auto buckets = pyruntime::plan_buckets({2, 50, 3, 0, 4}, 40, 4);
  CHECK_EQ(buckets, (std::vector<Bucket>{{0, 1, 2}, {1, 2, 50}, {2, 5, 7}}));
  auto first = pyruntime::plan_buckets({50, 1}, 40, 4);
  CHECK_EQ(first, (std::vector<Bucket>{{0, 1, 50}, {1, 2, 1}}));
}

TEST(buckets_count_alignment_padding) {
  // align 4: {3, 3} spans 8 elements (3, pad to 4, 3, pad to 8) = 32 bytes of fp32
  CHECK_EQ(pyruntime::plan_buckets({3, 3}, 32, 4, 4), (std::vector<Bucket>{{0, 2, 8}}));
  CHECK_EQ(pyruntime::plan_buckets({3, 3}, 28, 4, 4), (std::vector<Bucket>{{0, 1, 4}, {1, 2, 4}}));
}

TEST(buckets_cover_all_tensors_and_respect_the_cap) {
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 200; ++trial) {
    Numels numels(rng() % 20);
    for (auto& n : numels) n = static_cast<int64_t>(rng() % 40);
    const int64_t bytes = 1 + static_cast<int64_t>(rng() % 200), elem = 1 + static_cast<int64_t>(rng() % 4);
    const int64_t align = 1 + static_cast<int64_t>(rng() % 4);
    auto buckets = pyruntime::plan_buckets(numels, bytes, elem, align);
    int64_t next = 0;
    for (const Bucket& b : buckets) {
      CHECK_EQ(b.begin, next);
      CHECK(b.end > b.begin);
      Numels members(numels.begin() + b.begin, numels.begin() + b.end);
      CHECK_EQ(b.numel, FlatLayout(members, 1, align).total_numel());
      CHECK(b.numel * elem <= bytes || b.end - b.begin == 1);  // only a lone tensor may exceed
      next = b.end;
    }
    CHECK_EQ(next, static_cast<int64_t>(numels.size()));
  }
}

TEST(bucket_edge_cases) {
  CHECK(pyruntime::plan_buckets({}, 40, 4).empty());
  CHECK_EQ(pyruntime::plan_buckets({0, 0}, 40, 4), (std::vector<Bucket>{{0, 2, 0}}));
}

TEST(invalid_bucket_arguments_throw) {
  CHECK_THROWS_WITH(pyruntime::plan_buckets({1}, 0, 4), std::invalid_argument, "bucket_bytes must be >= 1, got 0");
  CHECK_THROWS_WITH(pyruntime::plan_buckets({1}, -5, 4), std::invalid_argument, "got -5");
  CHECK_THROWS_WITH(pyruntime::plan_buckets({1}, 40, 0), std::invalid_argument, "element_size must be >= 1, got 0");
  CHECK_THROWS_WITH(pyruntime::plan_buckets({1, -2}, 40, 4), std::invalid_argument, "numel of tensor 1");
  CHECK_THROWS_WITH(pyruntime::plan_buckets({1}, 40, 4, 0), std::invalid_argument, "align must be >= 1");
}

int main() { return pyruntime_test::run_all(); }
