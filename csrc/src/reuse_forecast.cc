// The native reuse forecast (see reuse_forecast.h). Each step mirrors the numpy code it names, in
// the same order of operations where the result is not an exact integer.
#include "moert/reuse_forecast.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "moert/common.h"

namespace moert {
namespace {

double log2p(double x) { return std::log2(1.0 + std::max(x, 0.0)); }  // reuse._log2p

std::int64_t mod(std::int64_t a, std::int64_t m) { return ((a % m) + m) % m; }

}  // namespace

ReuseForecaster::ReuseForecaster(ReuseForecastConfig config, ReuseWeights weights)
    : cfg_(std::move(config)), w_(std::move(weights)) {
  const auto& c = cfg_;
  MOERT_CHECK(c.layers >= 1 && c.experts >= 1, "ReuseForecaster: layers=", c.layers,
              " and experts=", c.experts, " must be >= 1");
  MOERT_CHECK(c.layers <= (1 << 16) && c.experts <= (1 << 16), "ReuseForecaster: layers=", c.layers,
              " and experts=", c.experts, " must be <= 65536");
  MOERT_CHECK(c.window >= 2 && c.window <= (1 << 20), "ReuseForecaster: window=", c.window,
              " must be in 2..2^20");
  MOERT_CHECK(c.ahead.size() <= 64 && c.match.size() <= 64 && c.decays.size() <= 64 &&
                  c.age_edges.size() <= 64,
              "ReuseForecaster: at most 64 look-aheads, match levels, decays and age edges");
  MOERT_CHECK(c.members >= 1 && c.members <= 64, "ReuseForecaster: members=", c.members,
              " must be in 1..64");
  MOERT_CHECK(
      static_cast<double>(c.layers) * c.window * ((c.experts + 63) / 64) * (c.ahead.size() + 1) <=
          double(1ULL << 31),
      "ReuseForecaster: layers x window x experts is too large for the induction rings (layers=",
      c.layers, ", window=", c.window, ", experts=", c.experts, ")");
  MOERT_CHECK(c.induction_layers >= 1, "ReuseForecaster: induction_layers=", c.induction_layers,
              " must be >= 1");
  MOERT_CHECK(!c.match.empty() && !c.ahead.empty() && !c.horizons.empty() && !c.decays.empty(),
              "ReuseForecaster: match, ahead, horizons and decays must not be empty");
  for (std::size_t i = 0; i < c.ahead.size(); ++i)
    MOERT_CHECK(c.ahead[i] >= 1 && (i == 0 || c.ahead[i] > c.ahead[i - 1]),
                "ReuseForecaster: ahead must be ascending and >= 1 (got ", c.ahead[i], " at ", i,
                ")");
  for (std::size_t i = 1; i < c.match.size(); ++i)
    MOERT_CHECK(c.match[i] <= c.match[i - 1], "ReuseForecaster: match must descend (got ",
                c.match[i], " after ", c.match[i - 1], ")");
  for (std::size_t i = 1; i < c.age_edges.size(); ++i)
    MOERT_CHECK(c.age_edges[i] > c.age_edges[i - 1], "ReuseForecaster: age_edges must ascend");
  L_ = c.layers;
  E_ = c.experts;
  H_ = static_cast<int>(c.horizons.size());
  MOERT_CHECK(c.horizons_used >= 1 && c.horizons_used <= H_,
              "ReuseForecaster: horizons_used=", c.horizons_used, " must be in 1..", H_);
  MOERT_CHECK(H_ <= 64, "ReuseForecaster: ", H_, " horizons; at most 64");
  MOERT_CHECK(c.density_from >= 0, "ReuseForecaster: density_from=", c.density_from,
              " must be >= 0");
  words_ = (E_ + 63) / 64;
  num_dense_ = static_cast<int>(c.age_edges.size()) + 2 + 5 + static_cast<int>(c.decays.size());
  const int M = static_cast<int>(c.match.size()), A = static_cast<int>(c.ahead.size());
  num_features_ = num_dense_ + M * (A + 1);
  const std::size_t K = static_cast<std::size_t>(c.members);
  D_ = static_cast<int>(w_.c1.size() / K);
  const std::size_t F2 = static_cast<std::size_t>(num_features_) + 2, LE = std::size_t(L_) * E_;
  MOERT_CHECK(D_ >= 1 && w_.c1.size() == K * D_ && w_.w1.size() == K * F2 * D_,
              "ReuseForecaster: w1 has ", w_.w1.size(), " values, want members x (F + 2) x D = ", K,
              " x ", F2, " x ", D_, " (a model of other features?)");
  MOERT_CHECK(
      w_.w2.size() == K * D_ * H_ && w_.c2.size() == K * H_ && w_.s_self.size() == K * H_ &&
          w_.s_prev.size() == K * H_,
      "ReuseForecaster: w2 / c2 / s_self / s_prev do not have members x (D x H / H) values (D=", D_,
      ", H=", H_, ", members=", K, ")");
  MOERT_CHECK(w_.bias.size() == K * LE * H_, "ReuseForecaster: bias has ", w_.bias.size(),
              " values, want members x L x E x H = ", K * LE * H_);
  MOERT_CHECK(w_.coact_self.size() == K * LE * E_ && w_.coact_prev.size() == K * LE * E_,
              "ReuseForecaster: coact_self / coact_prev must have members x L x E x E = ",
              K * LE * E_, " values");
  clock_.assign(L_, 0);
  last_.assign(LE, -1);
  gap1_.assign(LE, -1);
  gap2_.assign(LE, -1);
  ema_.assign(c.decays.size() * LE, 0.0);
  used_.assign(LE, 0);
  ring_.assign(LE / E_ * c.window * words_, 0);
  ahead_.assign(LE / E_ * c.window * A * words_, 0);
  memo_t_.assign(L_, -1);
  memo_.assign(std::size_t(L_) * c.window, 0.0);
  memo_size_.assign(L_, 0.0);
  x_.assign(std::size_t(E_) * num_features_, 0.0);
  overlap_.assign(c.window, 0.0);
  prev_ov_.assign(c.window, 0.0);
  hidden_.assign(D_, 0.0);
  logits_.assign(H_, 0.0);
  co_self_.assign(E_, 0.0);
  co_prev_.assign(E_, 0.0);
  psum_.assign(std::size_t(E_) * c.horizons_used, 0.0);
  window_.assign(words_, 0);
  matched_.reserve(c.window);
  matched_k_.reserve(c.window);
  candidates_.reserve(c.window);
}

std::int64_t ReuseForecaster::clock(int layer) const {
  MOERT_CHECK(layer >= 0 && layer < L_, "ReuseForecaster: layer=", layer, " not in 0..", L_ - 1);
  return clock_[layer];
}

// ReuseState.update of one call, with InductionState._update_one.
void ReuseForecaster::update(int l, const std::uint8_t* used) {
  const std::int64_t c = clock_[l], W = cfg_.window;
  const std::size_t base = std::size_t(l) * E_, LE = std::size_t(L_) * E_;
  for (int e = 0; e < E_; ++e) {
    const std::size_t i = base + e;
    const bool u = used[e] != 0;
    if (u && last_[i] >= 0) {
      gap2_[i] = gap1_[i];
      gap1_[i] = c - last_[i];
    }
    if (u) last_[i] = c;
    for (std::size_t d = 0; d < cfg_.decays.size(); ++d) {
      const double dec = cfg_.decays[d];
      double& m = ema_[d * LE + i];
      m = dec * m + (1.0 - dec) * (u ? 1.0 : 0.0);
    }
    used_[i] = u;
  }
  std::uint64_t* slot = ring(l, mod(c, W));
  std::fill(slot, slot + words_, 0);
  for (int e = 0; e < E_; ++e)
    if (used[e]) slot[e / 64] |= std::uint64_t(1) << (e % 64);
  const int A = static_cast<int>(cfg_.ahead.size());
  for (int a = 0; a < A; ++a) std::fill(ahead(l, mod(c, W), a), ahead(l, mod(c, W), a) + words_, 0);
  std::vector<std::uint64_t>& window = window_;
  std::fill(window.begin(), window.end(), 0);
  std::int64_t j = 0;
  for (int a = 0; a < A; ++a) {
    const std::int64_t n = cfg_.ahead[a];
    if (c < n || n >= W) break;
    for (; j < n; ++j) {  // the window c - n + 1 .. c
      const std::uint64_t* r = ring(l, mod(c - j, W));
      for (int w = 0; w < words_; ++w) window[w] |= r[w];
    }
    std::copy(window.begin(), window.end(), ahead(l, mod(c - n, W), a));
  }
  memo_t_[l] = -1;  // this layer's row changed (InductionState keys the memo by token: the same)
  ++clock_[l];
}

// ReuseState.features' dense part (reuse.dense_features) after the call at token t.
void ReuseForecaster::dense(int l, std::int64_t t, double* x) const {
  const std::size_t base = std::size_t(l) * E_, LE = std::size_t(L_) * E_;
  const int B = static_cast<int>(cfg_.age_edges.size()) + 2;
  for (int e = 0; e < E_; ++e) {
    double* row = x + std::size_t(e) * num_features_;
    const std::size_t i = base + e;
    const bool never = last_[i] < 0;
    const std::int64_t age = never ? -1 : t - last_[i];
    int bucket = B - 1;
    if (!never) {  // np.searchsorted(edges, age, side="left")
      bucket =
          static_cast<int>(std::lower_bound(cfg_.age_edges.begin(), cfg_.age_edges.end(), age) -
                           cfg_.age_edges.begin());
    }
    for (int b = 0; b < B; ++b) row[b] = b == bucket ? 1.0 : 0.0;
    const bool has1 = gap1_[i] >= 0, has2 = gap2_[i] >= 0;
    const double g1 = log2p(double(gap1_[i])), g2 = log2p(double(gap2_[i]));
    row[B + 0] = has1 ? g1 / 8.0 : 0.0;
    row[B + 1] = has1 ? 0.0 : 1.0;
    row[B + 2] = has2 ? g2 / 8.0 : 0.0;
    row[B + 3] = has2 ? 0.0 : 1.0;
    row[B + 4] = (has1 && !never) ? (log2p(double(age)) - g1) / 8.0 : 0.0;
    for (std::size_t d = 0; d < cfg_.decays.size(); ++d) row[B + 5 + d] = ema_[d * LE + i];
  }
}

// The experts of a ring row (its set bits), ascending.
static void bits_of(const std::uint64_t* row, int words, std::vector<int>& out) {
  out.clear();
  for (int w = 0; w < words; ++w)
    for (std::uint64_t b = row[w]; b; b &= b - 1) out.push_back(w * 64 + __builtin_ctzll(b));
}

// Experts of `ids` set in `row` (a few bit tests: cheaper than a popcount over the row without the
// popcnt instruction, which a portable build cannot assume).
static int shared(const std::uint64_t* row, const std::vector<int>& ids) {
  int n = 0;
  for (int e : ids) n += static_cast<int>((row[e >> 6] >> (e & 63)) & 1U);
  return n;
}

// InductionState._overlaps of one layer at token t, remembered (the memo of _features_one).
void ReuseForecaster::overlaps(int j, std::int64_t t) {
  const std::int64_t W = cfg_.window;
  double* ov = &memo_[std::size_t(j) * W];
  bits_of(ring(j, mod(t, W)), words_, ids_);
  double size = static_cast<double>(ids_.size());
  for (std::int64_t s = 0; s < W; ++s) ov[s] = shared(ring(j, s), ids_);
  if (cfg_.bigram && t >= 1) {  // slot s: token t - 1 against the token at slot s - 1
    bits_of(ring(j, mod(t - 1, W)), words_, ids_);
    for (std::int64_t s = 0; s < W; ++s) prev_ov_[s] = shared(ring(j, s), ids_);
    ov[0] += prev_ov_[W - 1];
    for (std::int64_t s = 1; s < W; ++s) ov[s] += prev_ov_[s - 1];
    size += static_cast<double>(ids_.size());
  }
  memo_size_[j] = size;
  memo_t_[j] = t;
}

// InductionState._features_one then _from_matches: the induction columns of layer l at token t.
void ReuseForecaster::induction(int l, std::int64_t t, double* x) {
  const std::int64_t W = cfg_.window;
  const int lo = std::max(l + 1 - cfg_.induction_layers, 0);
  std::fill(overlap_.begin(), overlap_.end(), 0.0);
  double size = 0.0;
  for (int j = lo; j <= l; ++j) {
    if (memo_t_[j] != t) overlaps(j, t);
    const double* ov = &memo_[std::size_t(j) * W];
    for (std::int64_t s = 0; s < W; ++s) overlap_[s] += ov[s];
    size += memo_size_[j];
  }
  const int M = static_cast<int>(cfg_.match.size()), A = static_cast<int>(cfg_.ahead.size());
  const std::int64_t bigram = cfg_.bigram ? 1 : 0;
  // the loosest level's matches (every level's are among them: the shares descend), with their k
  candidates_.clear();
  if (size > 0) {
    const double loosest = cfg_.match[M - 1] * size;
    const std::int64_t tw = mod(t, W);
    for (std::int64_t s = 0; s < W; ++s) {
      const std::int64_t k = s <= tw ? tw - s : tw - s + W;  // slot s holds token t - k
      if (k >= 1 && k <= t && k < W - bigram && overlap_[s] >= loosest)
        candidates_.push_back({s, k});
    }
  }
  for (int m = 0; m < M; ++m) {
    matched_.clear();
    matched_k_.clear();
    const double need = cfg_.match[m] * size;
    for (const auto& [s, k] : candidates_)
      if (overlap_[s] >= need) {
        matched_.push_back(s);
        matched_k_.push_back(k);
      }
    const double count = static_cast<double>(matched_.size());
    for (int a = 0; a < A; ++a) {
      double den = 1.0;
      for (std::int64_t k : matched_k_)
        if (k >= cfg_.ahead[a]) den += 1.0;
      // counts of e over the matching slots (a window not over yet is 0 in the ring)
      for (int e = 0; e < E_; ++e)
        x[std::size_t(e) * num_features_ + num_dense_ + m * (A + 1) + a] = 0.0;
      for (std::int64_t s : matched_) {
        const std::uint64_t* bits = ahead(l, s, a);
        for (int w = 0; w < words_; ++w) {
          std::uint64_t b = bits[w];
          while (b) {
            const int e = w * 64 + __builtin_ctzll(b);
            b &= b - 1;
            x[std::size_t(e) * num_features_ + num_dense_ + m * (A + 1) + a] += 1.0;
          }
        }
      }
      for (int e = 0; e < E_; ++e)
        x[std::size_t(e) * num_features_ + num_dense_ + m * (A + 1) + a] /= den;
    }
    const double col = std::log2(1.0 + count) / 8.0;
    for (int e = 0; e < E_; ++e)
      x[std::size_t(e) * num_features_ + num_dense_ + m * (A + 1) + A] = col;
  }
}

// ReuseModel.probabilities for one call, then log2_density or log2_distance.
void ReuseForecaster::forward(int l, const double* x, Value value, double* out) {
  const int F = num_features_, D = D_, H = H_, Hu = cfg_.horizons_used, K = cfg_.members;
  const std::size_t LE = std::size_t(l) * E_, LLE = std::size_t(L_) * E_;
  const std::size_t F2 = std::size_t(F) + 2;
  const std::uint8_t* used = &used_[LE];
  const std::uint8_t* prev = l > 0 ? &used_[LE - E_] : nullptr;
  std::vector<double>&co_self = co_self_, &co_prev = co_prev_, &hidden = hidden_, &logit = logits_;
  for (int k = 0; k < K; ++k) {  // ReuseModel.probabilities: the members' p summed in order
    const std::size_t kk = static_cast<std::size_t>(k);
    const double* w1 = &w_.w1[kk * F2 * D];
    const double* c1 = &w_.c1[kk * D];
    const double* w2 = &w_.w2[kk * D * H];
    const double* c2 = &w_.c2[kk * H];
    const double* s_self = &w_.s_self[kk * H];
    const double* s_prev = &w_.s_prev[kk * H];
    const double* cs = &w_.coact_self[(kk * LLE + LE) * E_];
    const double* cp = &w_.coact_prev[(kk * LLE + LE) * E_];
    std::fill(co_self.begin(), co_self.end(), 0.0);
    std::fill(co_prev.begin(), co_prev.end(), 0.0);
    for (int f = 0; f < E_; ++f) {
      if (used[f])
        for (int e = 0; e < E_; ++e) co_self[e] += cs[std::size_t(f) * E_ + e];
      if (prev && prev[f])
        for (int e = 0; e < E_; ++e) co_prev[e] += cp[std::size_t(f) * E_ + e];
    }
    for (int e = 0; e < E_; ++e) {
      const double* row = x + std::size_t(e) * F;
      std::fill(hidden.begin(), hidden.end(), 0.0);  // flat @ w1, then + c1 (as numpy)
      for (std::size_t f = 0; f < F2; ++f) {
        const double v = f < F2 - 2 ? row[f] : (f == F2 - 2 ? co_self[e] : co_prev[e]);
        if (v == 0.0) continue;  // adds +0 (one-hot and induction columns are mostly 0)
        const double* w = &w1[f * D];
        for (int j = 0; j < D; ++j) hidden[j] += v * w[j];
      }
      for (int h = 0; h < H; ++h) logit[h] = 0.0;
      for (int j = 0; j < D; ++j) {
        const double v = std::max(hidden[j] + c1[j], 0.0);
        if (v == 0.0) continue;
        const double* w = &w2[std::size_t(j) * H];
        for (int h = 0; h < H; ++h) logit[h] += v * w[h];
      }
      const double* bias = &w_.bias[(kk * LLE + LE + e) * H];
      double* p = &psum_[std::size_t(e) * Hu];
      for (int h = 0; h < Hu; ++h) {
        const double z =
            logit[h] + c2[h] + bias[h] + co_self[e] * s_self[h] + co_prev[e] * s_prev[h];
        const double ph = 1.0 / (1.0 + std::exp(-z));
        p[h] = k == 0 ? ph : p[h] + ph;
      }
    }
  }
  for (int e = 0; e < E_; ++e) {
    double p[64];
    for (int h = 0; h < Hu; ++h) {
      const double sum = psum_[std::size_t(e) * Hu + h];
      p[h] = K == 1 ? sum : sum / K;
    }
    double v;
    if (value == kDistance) {
      double g = 0.0;
      for (int h = 0; h < Hu; ++h) g += 1.0 - p[h];
      v = g;
    } else {
      double run = 0.0, best = 0.0;
      const int lo = std::min(cfg_.density_from, Hu - 1);
      for (int h = 0; h < Hu; ++h) {
        const double held = double(cfg_.horizons[h]) * (1.0 - p[h]);
        run += held;
        const double expected = (1.0 + run) - held;  // E[min(d, n_h)]
        if (h >= lo) best = std::max(best, p[h] / expected);
      }
      v = std::log2(std::max(best, std::exp2(cfg_.floor_log2)));
    }
    out[e] = std::nearbyint(v * cfg_.quantum) / cfg_.quantum;
  }
}

void ReuseForecaster::call(int layer, const std::uint8_t* used, Value value, double* out) {
  MOERT_CHECK(layer >= 0 && layer < L_, "ReuseForecaster.call: layer=", layer, " not in 0..",
              L_ - 1);
  update(layer, used);
  const std::int64_t t = clock_[layer] - 1;
  dense(layer, t, x_.data());
  induction(layer, t, x_.data());
  forward(layer, x_.data(), value, out);
}

void ReuseForecaster::sequence(std::int64_t tokens, const std::uint8_t* used, Value value,
                               double* out) {
  MOERT_CHECK(tokens >= 0, "ReuseForecaster.sequence: tokens=", tokens, " must be >= 0");
  const std::size_t stride = E_;
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int l = 0; l < L_; ++l) {
      const std::size_t at = (std::size_t(t) * L_ + l) * stride;
      call(l, used + at, value, out + at);
    }
}

void ReuseForecaster::features(int layer, double* out) {
  MOERT_CHECK(layer >= 0 && layer < L_, "ReuseForecaster.features: layer=", layer, " not in 0..",
              L_ - 1);
  MOERT_CHECK(clock_[layer] > 0, "ReuseForecaster.features: layer ", layer, " has had no call");
  const std::int64_t t = clock_[layer] - 1;
  dense(layer, t, out);
  induction(layer, t, out);
}

}  // namespace moert
