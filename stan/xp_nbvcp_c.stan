functions {
  #include functions/pln.stanfunctions
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
  vector[N] eta_std_lower = -a / sigma_M;  // eta >= 0
}
parameters {
  vector[G] m_free;
  real eta_level;
  sum_to_zero_vector[N] eta_dev;
  vector[G] log_r;  // log dispersion
}
transformed parameters {
  vector[N] eta = log1p_exp(eta_level + eta_dev);
  jacobian += sum(log_inv_logit(eta_level + eta_dev));
  vector[G] m = m_free + eta_level;
}
model {
  target += normal_lpdf(m | 0, 10);
  target += dispersion_lpdf(log_r);
  target += pln_capture_std_lpdf((eta - a) / sigma_M | eta_std_lower);
  target += sum(nbvcp_log_lik(counts, m, log_r, eta));
}
generated quantities {
  vector[G] r = exp(log_r);
  vector[N] log_lik = nbvcp_log_lik(counts, m, log_r, eta);
  array[N, G] int y_rep = nbvcp_y_rep_rng(m, log_r, eta);
}
