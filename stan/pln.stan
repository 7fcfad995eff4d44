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
// diagnose and compare. The sampled per-cell coordinates are the captured log-rates
// x_obs = x - eta 1, whitened by a Gaussian approximation of their conditional
// posterior given the globals (theta_z, theta_e), and the conditional quantile eta_q
// of eta (functions/capture.stanfunctions explains why). Every term is added with an
// explicit, normalized _lpdf/_lpmf so the log density keeps all constants.
functions {
  #include functions/pln.stanfunctions
  #include functions/capture.stanfunctions
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
  matrix[N, G] u = to_matrix(counts);
  // each count's own Gaussian in its log rate: at log(u + 1/2), Fisher information there
  matrix[N, G] count_log_rate = log(u + 0.5);
  matrix[N, G] count_weight = u + 0.5;
}
parameters {
  // mu = mu_level + mu_dev: its level is a coordinate of its own
  // (functions/capture.stanfunctions, the capture ridge)
  real mu_level;
  sum_to_zero_vector[G] mu_dev;
  matrix[G, K] W;  // loadings, identified only up to rotation W -> W R
  vector<lower=0>[G] d;
  vector<lower=1e-3>[loadings_prior > 0 ? K : 0] tau;  // loadings column scales
  matrix[N, K + 1] theta_z;  // whitened low-rank and capture coordinates of x_obs_c
  matrix[N, G] theta_e;  // whitened gene-specific coordinates of x_obs_c
  vector<lower=0, upper=1>[N] eta_q;  // quantile of eta_c given x_obs_c
}
transformed parameters {
  vector[G] mu = mu_level + mu_dev;
  matrix[G, G] Sigma = pln_covariance(W, d);
  matrix[N, G] x_obs;
  {
    // the whitening's expansion point and the IRLS working weight and response there
    matrix[N, G] log_rate = capture_working_log_rate(mu, W, d, sigma_M, a, count_log_rate,
                                                     count_weight);
    // also adds the log density of theta_z, theta_e (the latent prior of x_obs)
    x_obs = capture_whitened_latent_lp(mu, W, d, sigma_M, a, exp(log_rate),
                                       capture_working_response(u, log_rate), theta_z,
                                       theta_e);
  }
  real eta_scale = capture_conditional_scale(Sigma, sigma_M);  // of eta_c | x_obs_c
  vector[N] eta_loc = capture_conditional_loc(mu, Sigma, a, sigma_M, x_obs, eta_scale);
  vector[N] eta = capture_from_quantile(eta_q, eta_loc, rep_vector(eta_scale, N));
  matrix[N, G] x = x_obs + rep_matrix(eta, G);
}
model {
  target += pln_globals_lpdf(mu | d, W, tau, loadings_prior);
  // the latent prior of x_obs: added by capture_whitened_latent_lp
  target += capture_truncation_lpdf(eta_loc | eta_scale, a, sigma_M);
  target += uniform_lpdf(eta_q | 0, 1);  // zero; eta_q is a quantile
  target += sum(pln_log_lik(counts, x, eta));
}
generated quantities {
  vector[N] log_lik = pln_log_lik(counts, x, eta);
  array[N, G] int y_rep = pln_y_rep_rng(x, eta);
}
