// Logistic-normal multinomial (lnm) model conditional on the globals: NUTS over the
// per-cell ALR compositions y_c only, with mu_alr, W_alr, d_alr, log_m_T and log_r_T
// passed as data. This is the exact target that the per-cell Laplace step approximates.
// Same non-centring and normalized densities as stan/lnm.stan (the NB total term is a
// constant here but is kept so log_lik matches the full program).
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
  vector[N] log_lib;  // (contract; unused by lnm)
  real log_M0;  // (contract; unused by lnm)
  real<lower=0> sigma_M;  // (contract; unused by lnm)
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
  matrix[D, D] L_Sigma = cholesky_decompose(pln_covariance(W_alr, d_alr));
  real r_T = exp(log_r_T);
}
parameters {
  matrix[N, D] z;  // latent innovations
}
transformed parameters {
  matrix[N, D] y = pln_latent(mu_alr, L_Sigma, z);
}
model {
  target += std_normal_lpdf(to_vector(z));
  target += sum(lnm_log_lik(counts, total, y, ref, rep_vector(log_m_T, N), r_T));
}
generated quantities {
  vector[N] log_lik = lnm_log_lik(counts, total, y, ref, rep_vector(log_m_T, N), r_T);
  array[N, G] int y_rep = lnm_y_rep_rng(y, ref, rep_vector(log_m_T, N), r_T);
}
