// Fused CPU kernels of dynamic tables (lf_jax/embedding/dynamic), called through XLA's FFI
// (lf_jax/embedding/kernels/dynamic.py wraps them; build.py compiles every *.cc here).
//
// LfDynamicResolve: one shard's hash table resolves one step's keys, in place on the
//   donated state (XLA aliases it to the outputs): find, touch, admit (count-min sketch),
//   insert in at most probe_limit rounds (first free slot of the key's window, else the
//   lru / lfu victim; a slot proposed by several keys goes to the smallest (hi, lo)),
//   counters. The algorithm, step for step, of hash_table.resolve_shard (its docstring
//   states it; the dict reference lf_jax/testing/dynamic_reference.py is the same), so the
//   state, slots and counters are bit-identical to the XLA path. The one entry marked new
//   per inserted key is the key's first entry (XLA: the leader of its probe rounds).
// LfDynamicFind: the find alone (insert=False: evaluation), state read-only.
// LfDynamicRoute: the sender side of a routed step: each valid entry's owner shard
//   key_hash(k, owner_salt) % shards, one sent entry per distinct key (its first) and that
//   entry's rank among its owner's sent entries in entry order, the owners' loads
//   (key_dedupe.owner_ranks' contract).
//
// Shapes: C slots, N entries, depth x width sketch, counters [2, 8] (two words per
// counter: value = w0 + w1 * 2^31; hash_table.COUNTERS' order), S shards. The state may
// carry leading axes of size 1 (a device's [1, ...] block of the index, as shard_map
// hands it): passed as it is, XLA aliases the donated buffers without copying them.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using lf_jax_kernels::Fmix32;
using lf_jax_kernels::Invalid;
using lf_jax_kernels::Lease;

namespace {

constexpr int kCounters = 8;  // hits, misses, not_admitted, inserts, evictions, refused,
                              // probe_sum, probe_max

// keys.key_hash: a uint32 hash of the key (hi, lo) for salt.
uint32_t KeyHash(uint32_t hi, uint32_t lo, uint32_t salt) {
  return Fmix32(lo ^ Fmix32(hi ^ salt) * 0x9E3779B1u);
}

// Scratch reused between calls, one per concurrent call (a Lease, scratch.h).
// Invariants between calls: mark all 0, best and table all -1.
struct Scratch {
  std::vector<uint64_t> mark;   // [C] bits: touched or taken in this step (C / 8 bytes:
                                // stays in cache, where a byte per slot would miss)
  std::vector<int32_t> best;    // [C] the best proposer of a slot in a round
  std::vector<int32_t> table;   // open addressing over entries: key -> first entry
  std::vector<int32_t> used;    // table positions written (to clear them)
  std::vector<int32_t> marked;  // slots marked (to clear them)
  std::vector<int32_t> first, keys, missed, pending, choice, home, off, won;
  uint64_t buckets = 0;  // `table` positions in use: a power of two >= 2 N

  void Fit(int64_t capacity, int64_t n) {  // grows only (new elements keep the invariants)
    if (int64_t(mark.size()) * 64 < capacity) mark.resize((capacity + 63) / 64, 0);
    if (int64_t(best.size()) < capacity) best.resize(capacity, -1);
    for (buckets = 16; buckets < uint64_t(2 * n);) buckets *= 2;
    if (table.size() < buckets) table.resize(buckets, -1);
    first.resize(n);
    home.resize(n);
    off.resize(n);
    for (auto* v : {&keys, &marked, &missed, &pending, &won}) v->clear();
  }
};

// First entry of each distinct key among entries[0..count) (positions into hi / lo):
// first[i] for each entry i listed; the distinct keys' first entries appended to `keys`.
void FirstEntries(Scratch& s, const uint32_t* hi, const uint32_t* lo, const int32_t* entries,
                  int64_t count) {
  const uint64_t mask = s.buckets - 1;
  for (int64_t j = 0; j < count; ++j) {
    const int32_t i = entries[j];
    uint64_t b = KeyHash(hi[i], lo[i], 0x510E527Fu) & mask;
    while (true) {
      const int32_t at = s.table[b];
      if (at < 0) {
        s.table[b] = i;
        s.used.push_back(int32_t(b));
        s.keys.push_back(i);
        s.first[i] = i;
        break;
      }
      if (hi[at] == hi[i] && lo[at] == lo[i]) {
        s.first[i] = at;
        break;
      }
      b = (b + 1) & mask;
    }
  }
  for (int32_t b : s.used) s.table[b] = -1;
  s.used.clear();
}

struct Policy {
  int64_t probes, eviction, ttl, admit_after;  // eviction: 0 none, 1 lru, 2 lfu; ttl < 0: none
  bool Alive(int32_t last, int32_t step) const {
    return last >= 0 && (ttl < 0 || int64_t(step) - last <= ttl);
  }
};

struct Table {  // one shard's state, in place
  uint32_t *key_hi, *key_lo;
  int32_t *last, *freq;
  int64_t capacity;
};

// Window offset of key (hi, lo) at an alive slot, or -1.
int64_t Find(const Table& t, const Policy& p, int32_t step, int64_t home, uint32_t hi,
             uint32_t lo) {
  for (int64_t o = 0; o < p.probes; ++o) {
    int64_t c = home + o;
    if (c >= t.capacity) c -= t.capacity;
    if (t.key_lo[c] == lo && t.key_hi[c] == hi && p.Alive(t.last[c], step)) return o;
  }
  return -1;
}

// The slot key k proposes this round (window offset, or -1): the first free slot, else
// (lru / lfu) the untouched untaken alive slot of lowest score, first in window order.
bool Marked(const uint64_t* mark, int64_t c) { return mark[c >> 6] >> (c & 63) & 1; }

void Mark(uint64_t* mark, int64_t c) { mark[c >> 6] |= uint64_t(1) << (c & 63); }

int32_t Choose(const Table& t, const Policy& p, const uint64_t* mark, int32_t step,
               int64_t home) {
  int32_t victim = -1;
  int32_t v_freq = 0, v_last = 0;
  for (int64_t o = 0; o < p.probes; ++o) {
    int64_t c = home + o;
    if (c >= t.capacity) c -= t.capacity;
    if (Marked(mark, c)) continue;  // touched (alive) or taken
    if (!p.Alive(t.last[c], step)) return int32_t(o);
    if (p.eviction == 0) continue;
    const int32_t f = p.eviction == 2 ? t.freq[c] : 0, l = t.last[c];
    if (victim < 0 || f < v_freq || (f == v_freq && l < v_last)) {
      victim = int32_t(o);
      v_freq = f;
      v_last = l;
    }
  }
  return victim;
}

constexpr int64_t kAhead = 16;  // entries whose windows are prefetched ahead

void Prefetch(const Table& t, int64_t home) {  // a window's first slots (a hit's writes)
  __builtin_prefetch(t.key_lo + home);
  __builtin_prefetch(t.key_hi + home);
  __builtin_prefetch(t.last + home, 1);
  if (t.freq != nullptr) __builtin_prefetch(t.freq + home, 1);
}

int64_t Slot(int64_t home, int64_t off, int64_t capacity) {
  const int64_t c = home + off;
  return c >= capacity ? c - capacity : c;
}

void AddCounts(int32_t* counters, const int64_t* counts) {  // hash_table.add_counts
  for (int k = 0; k < kCounters; ++k) {
    const uint32_t low = uint32_t(counters[k]) + uint32_t(counts[k]);
    counters[kCounters + k] += int32_t(low >> 31);
    counters[k] = int32_t(low & 0x7FFFFFFFu);
  }
}

void Resolve(Table t, const Policy& p, int32_t* sketch, int64_t depth, int64_t width,
             int32_t* counters, const uint32_t* hi, const uint32_t* lo, const bool* valid,
             int64_t n, int32_t step, const uint32_t* salts, int32_t* slot_out,
             bool* new_out) {
  Lease<Scratch> lease;
  Scratch& s = *lease;
  s.Fit(t.capacity, n);
  int64_t counts[kCounters] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t probe_max = 0;
  std::vector<int32_t>& missed = s.missed;  // entries that miss
  // 1. find; the first entry of a found slot touches it (hit: freq + 1, counted once).
  // The windows are random reads of three [C] arrays, which the step's table update
  // has pushed out of the caches: homes first, then windows prefetched kAhead ahead.
  for (int64_t i = 0; i < n; ++i) {
    slot_out[i] = -1;
    new_out[i] = false;
    s.home[i] = int32_t(KeyHash(hi[i], lo[i], salts[0]) % uint32_t(t.capacity));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) Prefetch(t, s.home[i + kAhead]);
    if (!valid[i]) continue;
    const int64_t home = s.home[i];
    const int64_t o = Find(t, p, step, home, hi[i], lo[i]);
    if (o < 0) {
      missed.push_back(int32_t(i));
      continue;
    }
    const int64_t c = Slot(home, o, t.capacity);
    slot_out[i] = int32_t(c);
    if (!Marked(s.mark.data(), c)) {
      Mark(s.mark.data(), c);
      s.marked.push_back(int32_t(c));
      t.last[c] = step;
      ++t.freq[c];
      ++counts[0];
      counts[6] += o;
      probe_max = std::max<int64_t>(probe_max, o);
    }
  }
  // 2. one entry per missing key; admission by the sketch (every key adds, then reads)
  FirstEntries(s, hi, lo, missed.data(), int64_t(missed.size()));
  counts[1] = int64_t(s.keys.size());
  std::vector<int32_t>& pending = s.pending;  // admitted keys without a slot
  if (p.admit_after > 1) {
    for (int64_t d = 0; d < depth; ++d) {
      for (int32_t i : s.keys) ++sketch[d * width + KeyHash(hi[i], lo[i], salts[1 + d]) % width];
    }
    for (int32_t i : s.keys) {
      int32_t estimate = INT32_MAX;
      for (int64_t d = 0; d < depth; ++d) {
        estimate = std::min(estimate, sketch[d * width + KeyHash(hi[i], lo[i], salts[1 + d]) %
                                                             uint32_t(width)]);
      }
      if (estimate >= p.admit_after) pending.push_back(i);
    }
  } else {
    pending = s.keys;
  }
  counts[2] = counts[1] - int64_t(pending.size());
  // 3. insert rounds: proposals from the round's start, winners written after
  std::vector<int32_t>& won = s.won;
  std::vector<int32_t>& choice = s.choice;
  for (int64_t round = 0; round < p.probes && !pending.empty(); ++round) {
    const size_t count = pending.size();
    choice.resize(count);
    for (size_t j = 0; j < count; ++j) {
      const int32_t i = pending[j];
      choice[j] = Choose(t, p, s.mark.data(), step, s.home[i]);
      if (choice[j] < 0) continue;
      const int64_t c = Slot(s.home[i], choice[j], t.capacity);
      const int32_t b = s.best[c];
      if (b < 0 || hi[i] < hi[b] || (hi[i] == hi[b] && lo[i] < lo[b])) s.best[c] = i;
    }
    size_t kept = 0;
    for (size_t j = 0; j < count; ++j) {
      const int32_t i = pending[j];
      const int64_t c = choice[j] < 0 ? -1 : Slot(s.home[i], choice[j], t.capacity);
      if (c < 0 || s.best[c] != i) {
        pending[kept++] = i;  // kept < j + 1: the rest of pending is still unread
        continue;
      }
      s.best[c] = -1;  // each won slot has one winner: cleared once
      counts[4] += p.Alive(t.last[c], step);
      Mark(s.mark.data(), c);
      s.marked.push_back(int32_t(c));
      t.key_hi[c] = hi[i];
      t.key_lo[c] = lo[i];
      t.last[c] = step;
      t.freq[c] = 1;
      slot_out[i] = int32_t(c);
      new_out[i] = true;
      s.off[i] = choice[j];
      won.push_back(i);
    }
    pending.resize(kept);
  }
  counts[3] = int64_t(won.size());
  counts[5] = int64_t(pending.size());
  for (int32_t i : won) {
    counts[6] += s.off[i];
    probe_max = std::max<int64_t>(probe_max, s.off[i]);
  }
  // 4. every entry of a missing key reads its first entry's slot
  for (int32_t i : missed) slot_out[i] = slot_out[s.first[i]];
  for (int32_t c : s.marked) s.mark[c >> 6] = 0;
  const int32_t old_max = counters[kCounters - 1];
  AddCounts(counters, counts);
  counters[kCounters - 1] = int32_t(std::max<int64_t>(old_max, probe_max));
  counters[2 * kCounters - 1] = 0;
}

ffi::Error ResolveImpl(ffi::Buffer<ffi::U32>, ffi::Buffer<ffi::U32>, ffi::Buffer<ffi::S32>,
                       ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>,
                       ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                       ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::S32> step,
                       ffi::Buffer<ffi::U32> salts, ffi::ResultBuffer<ffi::U32> key_hi,
                       ffi::ResultBuffer<ffi::U32> key_lo, ffi::ResultBuffer<ffi::S32> last,
                       ffi::ResultBuffer<ffi::S32> freq, ffi::ResultBuffer<ffi::S32> sketch,
                       ffi::ResultBuffer<ffi::S32> counters, ffi::ResultBuffer<ffi::S32> slot,
                       ffi::ResultBuffer<ffi::PRED> is_new, int64_t probe_limit,
                       int64_t eviction, int64_t ttl, int64_t admit_after) {
  const int64_t capacity = int64_t(last->element_count()), n = int64_t(hi.element_count());
  auto sd = sketch->dimensions();  // [..., depth, width]
  if (sd.size() < 2) return Invalid("lf_jax dynamic resolve: sketch must be [..., depth, width]");
  const int64_t depth = sd[sd.size() - 2], width = sd[sd.size() - 1];
  if (key_hi->element_count() != size_t(capacity) || key_lo->element_count() != size_t(capacity) ||
      freq->element_count() != size_t(capacity) || counters->element_count() != 2 * kCounters ||
      sketch->element_count() != size_t(depth * width) || lo.element_count() != size_t(n) ||
      valid.element_count() != size_t(n) || salts.element_count() != size_t(1 + depth) ||
      capacity < 1) {
    return Invalid("lf_jax dynamic resolve: mismatched state, keys or salts");
  }
  const Policy p{std::min<int64_t>(probe_limit, capacity), eviction, ttl, admit_after};
  Table t{key_hi->typed_data(), key_lo->typed_data(), last->typed_data(), freq->typed_data(),
          capacity};
  Resolve(t, p, sketch->typed_data(), depth, width, counters->typed_data(), hi.typed_data(),
          lo.typed_data(), valid.typed_data(), n, step.typed_data()[0], salts.typed_data(),
          slot->typed_data(), is_new->typed_data());
  return ffi::Error::Success();
}

ffi::Error FindImpl(ffi::Buffer<ffi::U32> key_hi, ffi::Buffer<ffi::U32> key_lo,
                    ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::U32> hi,
                    ffi::Buffer<ffi::U32> lo, ffi::Buffer<ffi::PRED> valid,
                    ffi::Buffer<ffi::S32> step, ffi::Buffer<ffi::U32> salts,
                    ffi::ResultBuffer<ffi::S32> slot, int64_t probe_limit, int64_t ttl) {
  const int64_t capacity = int64_t(last.element_count()), n = int64_t(hi.element_count());
  if (capacity < 1 || key_hi.element_count() != size_t(capacity) ||
      key_lo.element_count() != size_t(capacity) || lo.element_count() != size_t(n) ||
      valid.element_count() != size_t(n)) {
    return Invalid("lf_jax dynamic find: mismatched state or keys");
  }
  const Policy p{std::min<int64_t>(probe_limit, capacity), 0, ttl, 1};
  const Table t{const_cast<uint32_t*>(key_hi.typed_data()),
                const_cast<uint32_t*>(key_lo.typed_data()),
                const_cast<int32_t*>(last.typed_data()), nullptr, capacity};
  const uint32_t *h = hi.typed_data(), *l = lo.typed_data();
  const int32_t now = step.typed_data()[0];
  int32_t* out = slot->typed_data();
  std::vector<int64_t> home(n);
  for (int64_t i = 0; i < n; ++i) home[i] = KeyHash(h[i], l[i], salts.typed_data()[0]) % capacity;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) Prefetch(t, home[i + kAhead]);
    const int64_t o = valid.typed_data()[i] ? Find(t, p, now, home[i], h[i], l[i]) : -1;
    out[i] = o < 0 ? -1 : int32_t(Slot(home[i], o, capacity));
  }
  return ffi::Error::Success();
}

ffi::Error RouteImpl(ffi::Buffer<ffi::U32> hi, ffi::Buffer<ffi::U32> lo,
                     ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::U32> salts,
                     ffi::ResultBuffer<ffi::S32> owner, ffi::ResultBuffer<ffi::S32> leader,
                     ffi::ResultBuffer<ffi::PRED> send, ffi::ResultBuffer<ffi::S32> rank,
                     ffi::ResultBuffer<ffi::S32> load) {
  const int64_t n = int64_t(hi.element_count()), shards = int64_t(load->element_count());
  if (lo.element_count() != size_t(n) || valid.element_count() != size_t(n) || shards < 1) {
    return Invalid("lf_jax dynamic route: mismatched keys or shards");
  }
  Lease<Scratch> lease;
  Scratch& s = *lease;
  s.Fit(0, n);
  std::vector<int32_t>& entries = s.missed;  // the valid entries
  const uint32_t *h = hi.typed_data(), *l = lo.typed_data();
  int32_t *own = owner->typed_data(), *lead = leader->typed_data(), *r = rank->typed_data();
  int32_t* count = load->typed_data();
  bool* sent = send->typed_data();
  std::fill(count, count + shards, 0);
  for (int64_t i = 0; i < n; ++i) {
    own[i] = int32_t(KeyHash(h[i], l[i], salts.typed_data()[0]) % uint32_t(shards));
    lead[i] = int32_t(i);
    sent[i] = false;
    r[i] = 0;
    if (valid.typed_data()[i]) entries.push_back(int32_t(i));
  }
  FirstEntries(s, h, l, entries.data(), int64_t(entries.size()));
  for (int32_t i : entries) lead[i] = s.first[i];
  for (int32_t i : s.keys) {  // first entries, in entry order
    sent[i] = true;
    r[i] = count[own[i]]++;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDynamicResolve, ResolveImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // key_hi [C]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // key_lo [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // freq [C]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sketch [depth, width]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // counters [2, 8]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // hi [N]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // lo [N]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // step []
                                  .Arg<ffi::Buffer<ffi::U32>>()   // salts [1 + depth]
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()   // slot [N]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // new [N]
                                  .Attr<int64_t>("probe_limit")
                                  .Attr<int64_t>("eviction")
                                  .Attr<int64_t>("ttl")
                                  .Attr<int64_t>("admit_after"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDynamicFind, FindImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("probe_limit")
                                  .Attr<int64_t>("ttl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDynamicRoute, RouteImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()   // owner [M]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // leader [M]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // send [M]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // rank [M]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // load [S]
