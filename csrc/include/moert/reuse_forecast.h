// The reuse forecast of policy `learned`, native: the online state of
// moert.predict.reuse.ReuseState (recency, gaps, moving averages of use, the induction window of
// moert.predict.reuse_induction) and the ReuseModel's forward pass, one layer call at a time. The
// Python code stays the definition (the training examples are its features); this is the same
// arithmetic for the runtime's hot path and the simulator's replays, which both call it, so they
// make the same decisions.
//
// A call of layer l at its token t (the router has picked `used`): the state takes the call, then
// every expert's features after it give the horizons' probabilities p_h = P(use at l within n_h
// calls) and one value per expert, rounded to 1/quantum:
//   kDensity: log2 of the hit density max_{h >= density_from} p_h / E[min(d, n_h)] (floored);
//   kDistance: E[log2 min(d, 2 n)] = sum_h (1 - p_h) over the horizons used.
// The induction rings hold each token's experts as bits (64 experts per word), so a past token's
// overlap with this one is a popcount.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace moert {

struct ReuseForecastConfig {
  int layers = 0;
  int experts = 0;
  std::vector<std::int64_t> age_edges;  // AGE_EDGES
  std::vector<double> decays;           // DECAYS
  std::int64_t window = 0;              // INDUCTION_WINDOW
  int induction_layers = 0;             // INDUCTION_LAYERS
  bool bigram = true;                   // INDUCTION_BIGRAM
  std::vector<double> match;            // INDUCTION_MATCH (descending)
  std::vector<std::int64_t> ahead;      // INDUCTION_AHEAD
  std::vector<std::int64_t> horizons;   // HORIZONS
  int horizons_used = 0;
  int density_from = 1;
  double quantum = 256.0;
  double floor_log2 = -64.0;
  int members = 1;  // an ensemble: the mean of the members' probabilities
};

// ReuseModel's tensors, row-major float64: w1 (F + 2, D), c1 (D), w2 (D, H), c2 (H), bias (L, E,
// H), coact_self / coact_prev (L, E, E), s_self / s_prev (H).
struct ReuseWeights {
  std::vector<double> w1, c1, w2, c2, bias, coact_self, coact_prev, s_self, s_prev;
};

class ReuseForecaster {
 public:
  enum Value { kDensity = 0, kDistance = 1 };

  ReuseForecaster(ReuseForecastConfig config, ReuseWeights weights);

  // One call of `layer` that used `used` (E bytes, nonzero = used): updates the state, writes E
  // values
  // (`value`) to out.
  void call(int layer, const std::uint8_t* used, Value value, double* out);
  // A sequence of T tokens' calls of every layer in order (used: T x L x E bytes; out: T x L x E).
  void sequence(std::int64_t tokens, const std::uint8_t* used, Value value, double* out);
  // The features (E x F) of `layer` after its last call (tests compare them with the Python
  // state's).
  void features(int layer, double* out);

  int num_features() const { return num_features_; }
  int num_dense() const { return num_dense_; }
  std::int64_t clock(int layer) const;
  const ReuseForecastConfig& config() const { return cfg_; }

 private:
  void update(int layer, const std::uint8_t* used);
  void dense(int layer, std::int64_t t, double* x) const;  // E x F, the dense columns
  void induction(int layer, std::int64_t t, double* x);    // E x F, the induction columns
  void overlaps(int layer, std::int64_t t);                // into memo_ of `layer`
  void forward(int layer, const double* x, Value value, double* out);

  const std::uint64_t* ring(int layer, std::int64_t slot) const {
    return &ring_[(static_cast<std::size_t>(layer) * cfg_.window + slot) * words_];
  }
  std::uint64_t* ring(int layer, std::int64_t slot) {
    return &ring_[(static_cast<std::size_t>(layer) * cfg_.window + slot) * words_];
  }
  std::uint64_t* ahead(int layer, std::int64_t slot, int a) {
    return &ahead_[((static_cast<std::size_t>(layer) * cfg_.window + slot) * cfg_.ahead.size() +
                    a) *
                   words_];
  }

  ReuseForecastConfig cfg_;
  ReuseWeights w_;
  int L_, E_, H_, D_, words_, num_dense_, num_features_;
  std::vector<std::int64_t> clock_;               // L
  std::vector<std::int64_t> last_, gap1_, gap2_;  // L x E
  std::vector<double> ema_;                       // decays x L x E
  std::vector<std::uint8_t> used_;                // L x E: each layer's last call
  std::vector<std::uint64_t> ring_;               // L x W x words
  std::vector<std::uint64_t> ahead_;              // L x W x A x words
  std::vector<std::int64_t> memo_t_;  // L: the token of the remembered overlaps (-1: none)
  std::vector<double> memo_;          // L x W overlaps
  std::vector<double> memo_size_;     // L
  // scratch
  std::vector<double> x_, overlap_, prev_ov_, hidden_, logits_, co_self_, co_prev_, psum_;
  std::vector<std::uint64_t> window_;
  std::vector<std::int64_t> matched_, matched_k_;
  std::vector<int> ids_;
  std::vector<std::pair<std::int64_t, std::int64_t>> candidates_;  // (slot, k)
};

}  // namespace moert
