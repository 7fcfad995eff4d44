// Logistic-normal multinomial with variable capture (lnmvcp): full joint posterior.
//
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   total_c ~ neg_binomial_2(m_T exp(-eta_c), r_T)
//   y_c     ~ multi_normal(mu_alr, W_alr W_alr' + diag(d_alr))     (ALR, reference `ref`)
//   counts[c] | total_c ~ multinomial(total_c, softmax(y_c with 0 at `ref`))
//
// exp(-eta_c) is the capture efficiency; the capture prior is pln's. m_T is the mean
// total mRNA count before capture. Priors as in stan/lnm.stan. y and eta non-centred.
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
  vector[N] eta_std_lower = -a / sigma_M;  // eta >= 0
}
parameters {
  vector[D] mu_alr;
  matrix[D, K] W_alr;  // loadings, identified only up to rotation W_alr -> W_alr R
  vector<lower=0>[D] d_alr;
  real log_m_T_free;
  real log_r_T;
  matrix[N, D] y;
  real eta_level;
  sum_to_zero_vector[N] eta_dev;
}
transformed parameters {
  matrix[D, D] Sigma_alr = pln_covariance(W_alr, d_alr);
  vector[N] eta = log1p_exp(eta_level + eta_dev);
  jacobian += sum(log_inv_logit(eta_level + eta_dev));
  real log_m_T = log_m_T_free + eta_level;
  real m_T = exp(log_m_T);
  real r_T = exp(log_r_T);
}
model {
  target += lnm_composition_prior_lpdf(mu_alr | W_alr, d_alr);
  target += normal_lpdf(log_m_T | 0, 10);
  target += dispersion_lpdf([log_r_T]');
  target += pln_latent_lpdf(y | mu_alr, cholesky_decompose(Sigma_alr));
  target += pln_capture_std_lpdf((eta - a) / sigma_M | eta_std_lower);
  target += sum(lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T));
}
generated quantities {
  vector[N] log_lik = lnm_log_lik(counts, total, y, ref, log_m_T - eta, r_T);
  array[N, G] int y_rep = lnm_y_rep_rng(y, ref, log_m_T - eta, r_T);
}
