// Negative-binomial log-normal (nbln) model: full joint posterior of globals and
// per-cell latents.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   x_c     ~ multi_normal(mu, Sigma),  Sigma = W W' + diag(d)
//   u[c, g] ~ neg_binomial_2(exp(x[c, g] - eta_c), r_g),  r_g = exp(log_r_g)
//
// Priors (see scribe_stan/models/nbln.py): mu, W, d, the loadings column scales tau
// and the capture prior exactly as stan/pln.stan (functions/pln.stanfunctions);
// log_r ~ normal(log 10, 3) (functions/dispersion.stanfunctions). Both x and eta are
// non-centred. Every term is added with an explicit, normalized _lpdf/_lpmf so the
// log density keeps all constants.
functions {
  #include functions/pln.stanfunctions
  #include functions/dispersion.stanfunctions
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
  int<lower=0, upper=3> loadings_prior;  // 0 normal, 1 gaussian, 2 horseshoe, 3 neg
}
transformed data {
  vector[N] a = log_M0 - log_lib;  // prior location of eta
  vector[N] eta_std_lower = -a / sigma_M;  // eta >= 0
}
parameters {
  vector[G] mu_free;  // mu - mean(eta)
  matrix[G, K] W;  // loadings, identified only up to rotation W -> W R
  vector<lower=0>[G] d;
  vector<lower=1e-3>[loadings_prior > 0 ? K : 0] tau;  // loadings column scales
  vector[G] log_r;  // log dispersions
  matrix[N, G] z;  // latent innovations
  vector<lower=eta_std_lower>[N] eta_std;  // standardized capture
}
transformed parameters {
  matrix[G, G] Sigma = pln_covariance(W, d);
  vector[N] eta = a + sigma_M * eta_std;
  vector[G] mu = mu_free + mean(eta);
  matrix[N, G] x = pln_latent(mu, cholesky_decompose(Sigma), z);
}
model {
  target += pln_globals_lpdf(mu | d, W, tau, loadings_prior);
  target += dispersion_lpdf(log_r);
  target += std_normal_lpdf(to_vector(z));
  target += pln_capture_std_lpdf(eta_std | eta_std_lower);
  target += sum(nbln_log_lik(counts, x, eta, log_r));
}
generated quantities {
  vector[G] r = exp(log_r);
  vector[N] log_lik = nbln_log_lik(counts, x, eta, log_r);
  array[N, G] int y_rep = nbln_y_rep_rng(x, eta, log_r);
}
