// Logistic-normal multinomial with variable capture (lnmvcp): full joint posterior.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   total_c ~ neg_binomial_2(m_T exp(-eta_c), r_T)
//   y_c     ~ multi_normal(mu_alr, W_alr W_alr' + diag(d_alr))     (ALR, reference `ref`)
//   counts[c] | total_c ~ multinomial(total_c, softmax(y_c with 0 at `ref`))
//
// exp(-eta_c) is the capture efficiency; the capture prior is pln's. m_T is the mean
// total mRNA count before capture. Priors as in stan/lnm.stan. y is non-centred; eta is
// sampled as its quantile eta_q in an approximate conditional given (m_T, r_T)
// (functions/capture.stanfunctions explains why).
functions {
  #include functions/pln.stanfunctions
  #include functions/dispersion.stanfunctions
  #include functions/lnm.stanfunctions
  #include functions/capture.stanfunctions
}
data {
  int<lower=2> N;  // cells
  int<lower=3> G;  // genes
  int<lower=1, upper=G - 2> K;  // latent rank, K < G - 1
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes
  real log_M0;  // log prior median total mRNA per cell
  real<lower=0> sigma_M;  // capture prior scale
  int<lower=1, upper=G> ref;  // reference gene of the ALR coordinates (1-based)
}
transformed data {
  int D = G - 1;
  array[N] int total;
  for (c in 1:N) {
    total[c] = sum(counts[c]);
  }
  vector[N] a = log_M0 - log_lib;  // prior location of eta
}
parameters {
  vector[D] mu_alr;
  matrix[D, K] W_alr;  // loadings, identified only up to rotation W_alr -> W_alr R
  vector<lower=0>[D] d_alr;
  real log_m_T;  // log mean total mRNA before capture
  real log_r_T;
  matrix[N, D] z;
  vector<lower=0, upper=1>[N] eta_q;  // quantile of eta_c given (m_T, r_T), approx.
}
transformed parameters {
  matrix[D, D] Sigma_alr = pln_covariance(W_alr, d_alr);
  matrix[N, D] y = pln_latent(mu_alr, cholesky_decompose(Sigma_alr), z);
  real m_T = exp(log_m_T);
  real r_T = exp(log_r_T);
  vector[N] eta_loc = capture_totals_loc(total, log_m_T, r_T, a, sigma_M);
  vector[N] eta_scale = inv_sqrt(capture_totals_precision(total, r_T, sigma_M));
  vector[N] eta = capture_totals_jacobian(eta_q, eta_loc, eta_scale);
}
model {
  target += lnm_composition_prior_lpdf(mu_alr | W_alr, d_alr);
  target += normal_lpdf(log_m_T | 0, 10);
  target += dispersion_lpdf([log_r_T]');
  target += std_normal_lpdf(to_vector(z));
  target += capture_prior_lpdf(eta | a, sigma_M);
  target += uniform_lpdf(eta_q | 0, 1);  // zero; eta_q is a quantile
  target += sum(lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T));
}
generated quantities {
  vector[N] log_lik = lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T);
  array[N, G] int y_rep = lnm_y_rep_rng(y, ref, log_m_T - eta, r_T);
}
