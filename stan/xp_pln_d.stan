// Poisson log-normal (pln) model: full joint posterior of globals and per-cell latents.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   x_c     ~ multi_normal(mu, Sigma),  Sigma = W W' + diag(d)
//   u[c, g] ~ poisson(exp(x[c, g] - eta_c))
//
// Priors (see scribe_stan/models/pln.py and loadings.py): mu ~ normal(0, 10),
// d ~ gamma(2, 4); unconstrained loadings W with either iid normal(0, 1) entries or a
// columnwise shrinkage prior on W_perp with column scales tau (loadings_prior 1-3, for
// adaptive rank), the Laplace solver's prior. W is identified only up to rotation and
// sign; Sigma, corr and the singular values of W_perp are not, and are what to
// diagnose and compare. Both x and eta are non-centred. Every term is added with an
// explicit, normalized _lpdf/_lpmf so the log density keeps all constants.
functions {
  #include functions/pln.stanfunctions
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
  vector[G] mu_free;  // mu - eta_level
  matrix[G, K] W;  // loadings, identified only up to rotation W -> W R
  vector<lower=0>[G] d;
  vector<lower=1e-3>[loadings_prior > 0 ? K : 0] tau;  // loadings column scales
  matrix[N, G] z;  // latent innovations
  real eta_level;
  sum_to_zero_vector[N] eta_dev;
}
transformed parameters {
  matrix[G, G] Sigma = pln_covariance(W, d);
  vector[N] eta = log1p_exp(eta_level + eta_dev);
  jacobian += sum(log_inv_logit(eta_level + eta_dev));
  vector[G] mu = mu_free + eta_level;
  matrix[N, G] x = pln_latent(mu, cholesky_decompose(Sigma), z);
}
model {
  target += pln_globals_lpdf(mu | d, W, tau, loadings_prior);
  target += std_normal_lpdf(to_vector(z));
  target += pln_capture_std_lpdf((eta - a) / sigma_M | eta_std_lower);
  target += sum(pln_log_lik(counts, x, eta));
}
generated quantities {
  vector[N] log_lik = pln_log_lik(counts, x, eta);
  array[N, G] int y_rep = pln_y_rep_rng(x, eta);
}
