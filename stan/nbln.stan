// Negative-binomial log-normal (nbln) model: full joint posterior of globals and
// per-cell latents.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   x_c     ~ multi_normal(mu, Sigma),  Sigma = W W' + diag(d)
//   u[c, g] ~ neg_binomial_2(exp(x[c, g] - eta_c), r_g),  r_g = exp(log_r_g)
//
// Priors (see scribe_stan/models/nbln.py): mu, W, d, the loadings column scales tau
// and the capture prior exactly as stan/pln.stan (functions/pln.stanfunctions);
// log_r ~ normal(log 10, 3) (functions/dispersion.stanfunctions). The sampled per-cell
// coordinates are the captured log-rates x_obs = x - eta 1, whitened by a Gaussian
// approximation of their conditional posterior given the globals (theta_z, theta_e;
// the counts' working weight here is the negative binomial's), and the conditional
// quantile eta_q of eta (functions/capture.stanfunctions explains why).
// Every term is added with an explicit, normalized _lpdf/_lpmf so the log density
// keeps all constants.
functions {
  #include functions/pln.stanfunctions
  #include functions/capture.stanfunctions
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
  matrix[N, G] u = to_matrix(counts);
  matrix[N, G] count_log_rate = log(u + 0.5);  // where each count's own Gaussian sits
}
parameters {
  // mu = mu_level + mu_dev: its level is a coordinate of its own
  // (functions/capture.stanfunctions, the capture ridge)
  real mu_level;
  sum_to_zero_vector[G] mu_dev;
  matrix[G, K] W;  // loadings, identified only up to rotation W -> W R
  vector<lower=0>[G] d;
  vector<lower=1e-3>[loadings_prior > 0 ? K : 0] tau;  // loadings column scales
  vector[G] log_r;  // log dispersions
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
                                                     nbln_working_weight(u + 0.5, log_r));
    // also adds the log density of theta_z, theta_e (the latent prior of x_obs)
    x_obs = capture_whitened_latent_lp(mu, W, d, sigma_M, a,
                                       nbln_working_weight(exp(log_rate), log_r),
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
  target += dispersion_lpdf(log_r);
  // the latent prior of x_obs: added by capture_whitened_latent_lp
  target += capture_truncation_lpdf(eta_loc | eta_scale, a, sigma_M);
  target += uniform_lpdf(eta_q | 0, 1);  // zero; eta_q is a quantile
  target += sum(nbln_log_lik(counts, x, eta, log_r));
}
generated quantities {
  vector[G] r = exp(log_r);
  vector[N] log_lik = nbln_log_lik(counts, x, eta, log_r);
  array[N, G] int y_rep = nbln_y_rep_rng(x, eta, log_r);
}
