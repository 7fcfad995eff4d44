// Negative-binomial log-normal (nbln) model conditional on the globals: NUTS over the
// per-cell latents (x_c, eta_c) only, with mu, W, d and log_r passed as data. This is
// the exact target that the per-cell Laplace step approximates. Same non-centring and
// normalized densities as stan/nbln.stan.
functions {
  #include functions/pln.stanfunctions
  #include functions/nbln.stanfunctions
}
data {
  int<lower=1> N;  // cells
  int<lower=1> G;  // genes
  int<lower=1, upper=G> K;  // latent rank
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes
  real log_M0;  // log prior median total mRNA per cell
  real<lower=0> sigma_M;  // capture prior scale
  vector[G] mu;
  matrix[G, K] W;
  vector<lower=0>[G] d;
  vector[G] log_r;  // log dispersions
}
transformed data {
  vector[N] a = log_M0 - log_lib;  // prior location of eta
  vector[N] eta_std_lower = -a / sigma_M;  // eta >= 0
  matrix[G, G] L_Sigma = cholesky_decompose(pln_covariance(W, d));
}
parameters {
  matrix[N, G] z;  // latent innovations
  vector<lower=eta_std_lower>[N] eta_std;  // standardized capture
}
transformed parameters {
  vector[N] eta = a + sigma_M * eta_std;
  matrix[N, G] x = pln_latent(mu, L_Sigma, z);
}
model {
  target += std_normal_lpdf(to_vector(z));
  target += pln_capture_std_lpdf(eta_std | eta_std_lower);
  target += sum(nbln_log_lik(counts, x, eta, log_r));
}
generated quantities {
  vector[N] log_lik = nbln_log_lik(counts, x, eta, log_r);
  array[N, G] int y_rep = nbln_y_rep_rng(x, eta, log_r);
}
