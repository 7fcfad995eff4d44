// Logistic-normal multinomial (lnm) model: full joint posterior of globals and per-cell
// ALR compositions (Billheimer, Guttorp & Fagan 2001, JASA 96:1205,
// doi:10.1198/016214501753381850).
//
//   total_c ~ neg_binomial_2(m_T, r_T),           total_c = sum_g counts[c, g]
//   y_c     ~ multi_normal(mu_alr, Sigma_alr),    Sigma_alr = W_alr W_alr' + diag(d_alr)
//   counts[c] | total_c ~ multinomial(total_c, softmax(logits)), logits = y_c with 0
//                                                 inserted at the reference gene `ref`
//
// y_c lives in ALR coordinates (G - 1 of them) against the reference gene `ref`.
// Priors (scribe_stan/models/lnm.py): the composition globals get pln's priors
// (mu_alr ~ normal(0, 10), unconstrained loadings W_alr ~ normal(0, 1) entrywise,
// identified only up to rotation, d_alr ~ gamma(2, 4)); log_m_T ~ normal(0, 10)
// (pln's mu prior); log_r_T ~ normal(log 10, 3) (the shared NB dispersion prior).
// y is non-centred.
// log_lib, log_M0 and sigma_M are part of the shared data contract; lnm has no capture
// latent and does not use them (lnmvcp does).
functions {
  #include functions/pln.stanfunctions
  #include functions/dispersion.stanfunctions
  #include functions/lnm.stanfunctions
  real pln_latent_lpdf(matrix x, vector mu, matrix L_Sigma) {
    int N = rows(x);
    array[N] row_vector[cols(x)] xs;
    for (c in 1:N) xs[c] = x[c];
    return multi_normal_cholesky_lpdf(xs | mu', L_Sigma);
  }
}
data {
  int<lower=2> N;  // cells
  int<lower=3> G;  // genes
  int<lower=1, upper=G - 2> K;  // latent rank, K < G - 1
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes (contract; unused by lnm)
  real log_M0;  // (contract; unused by lnm)
  real<lower=0> sigma_M;  // (contract; unused by lnm)
  int<lower=1, upper=G> ref;  // reference gene of the ALR coordinates (1-based)
}
transformed data {
  int D = G - 1;  // ALR dimension
  array[N] int total;
  for (c in 1:N) {
    total[c] = sum(counts[c]);
  }
}
parameters {
  vector[D] mu_alr;
  matrix[D, K] W_alr;  // loadings, identified only up to rotation W_alr -> W_alr R
  vector<lower=0>[D] d_alr;
  real log_m_T;  // log mean total count
  real log_r_T;  // log dispersion of the total
  matrix[N, D] y;
}
transformed parameters {
  matrix[D, D] Sigma_alr = pln_covariance(W_alr, d_alr);
  real m_T = exp(log_m_T);
  real r_T = exp(log_r_T);
}
model {
  target += lnm_composition_prior_lpdf(mu_alr | W_alr, d_alr);
  target += normal_lpdf(log_m_T | 0, 10);
  target += dispersion_lpdf([log_r_T]');
  target += pln_latent_lpdf(y | mu_alr, cholesky_decompose(Sigma_alr));
  target += sum(lnm_log_lik(counts, total, y, ref, rep_vector(log_m_T, N), r_T));
}
generated quantities {
  vector[N] log_lik = lnm_log_lik(counts, total, y, ref, rep_vector(log_m_T, N), r_T);
  array[N, G] int y_rep = lnm_y_rep_rng(y, ref, rep_vector(log_m_T, N), r_T);
}
