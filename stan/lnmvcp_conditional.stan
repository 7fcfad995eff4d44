// lnmvcp conditional on the globals: NUTS over the per-cell ALR compositions y_c and
// capture losses eta_c, with mu_alr, W_alr, d_alr, log_m_T and log_r_T passed as data.
// The exact target of the per-cell Laplace step (composition and capture blocks).
functions {
  #include functions/pln.stanfunctions
  #include functions/dispersion.stanfunctions
  #include functions/lnm.stanfunctions
}
data {
  int<lower=1> N;  // cells
  int<lower=3> G;  // genes
  int<lower=1, upper=G - 2> K;  // latent rank
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes
  real log_M0;  // log prior median total mRNA per cell
  real<lower=0> sigma_M;  // capture prior scale
  int<lower=1, upper=G> ref;  // reference gene (1-based)
  vector[G - 1] mu_alr;
  matrix[G - 1, K] W_alr;
  vector<lower=0>[G - 1] d_alr;
  real log_m_T;
  real log_r_T;
}
transformed data {
  int D = G - 1;
  array[N] int total;
  for (c in 1:N) {
    total[c] = sum(counts[c]);
  }
  vector[N] a = log_M0 - log_lib;  // prior location of eta
  vector[N] eta_std_lower = -a / sigma_M;  // eta >= 0
  matrix[D, D] L_Sigma = cholesky_decompose(pln_covariance(W_alr, d_alr));
  real r_T = exp(log_r_T);
}
parameters {
  matrix[N, D] z;
  vector<lower=eta_std_lower>[N] eta_std;
}
transformed parameters {
  matrix[N, D] y = pln_latent(mu_alr, L_Sigma, z);
  vector[N] eta = a + sigma_M * eta_std;
}
model {
  target += std_normal_lpdf(to_vector(z));
  target += pln_capture_std_lpdf(eta_std | eta_std_lower);
  target += sum(lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T));
}
generated quantities {
  vector[N] log_lik = lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T);
  array[N, G] int y_rep = lnm_y_rep_rng(y, ref, log_m_T - eta, r_T);
}
