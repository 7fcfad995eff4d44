// Independent-gene negative binomial with variable capture probability (nbvcp):
// full joint posterior of the per-gene globals and the per-cell capture.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   u[c, g] ~ neg_binomial_2(exp(m_g - eta_c), r_g),  r_g = exp(log_r_g)
//
// It is the Sigma -> 0 limit of the nbln model. Priors (see
// scribe_stan/models/nbvcp.py): m ~ normal(0, 10) as pln's mu; log_r ~ normal(log 10, 3)
// (functions/dispersion.stanfunctions). Every term is a normalized _lpdf/_lpmf on m, log_r
// and eta, so the log density keeps all constants.
// Sampled: m_free = m - eta_level, log_r, and eta through (eta_level, eta_dev)
// (nbvcp_capture_jacobian): the capture gauge (m + s, eta + s) is then eta_level alone.
functions {
  #include functions/dispersion.stanfunctions
  #include functions/nbvcp.stanfunctions
}
data {
  int<lower=1> N;  // cells
  int<lower=1> G;  // genes
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes
  real log_M0;  // log prior median total mRNA per cell
  real<lower=0> sigma_M;  // capture prior scale
}
transformed data {
  vector[N] a = log_M0 - log_lib;  // prior location of eta
}
parameters {
  vector[G] m_free;  // log mean relative to the capture level, m - eta_level
  vector[G] log_r;  // log dispersion
  real eta_level;  // common level of the capture losses
  sum_to_zero_vector[N] eta_dev;  // their differences between cells
}
transformed parameters {
  vector[N] eta = nbvcp_capture_jacobian(eta_level, eta_dev);
  vector[G] m = m_free + eta_level;  // log mean expression before capture
}
model {
  target += normal_lpdf(m | 0, 10);
  target += dispersion_lpdf(log_r);
  target += nbvcp_capture_lpdf(eta | a, sigma_M);
  target += sum(nbvcp_log_lik(counts, m, log_r, eta));
}
generated quantities {
  vector[G] r = exp(log_r);
  vector[N] log_lik = nbvcp_log_lik(counts, m, log_r, eta);
  array[N, G] int y_rep = nbvcp_y_rep_rng(m, log_r, eta);
}
