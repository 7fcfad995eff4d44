// Stan's embedded Laplace approximation of each cell's marginal likelihood in the
// negative-binomial log-normal (nbln) model, at given globals (mu, W, d, log_r) and
// capture eta:
//
//   log_marginal[c] ~= log integral prod_g neg_binomial_2(u_cg | exp(x_g - eta_c), r_g)
//                      normal(x | mu, Sigma) dx
//
// The reference value of the Laplace objective. Stan's latent variable is
// theta = x - mu ~ normal(0, Sigma); the offset mu - eta_c enters the log mean.
// Stan 2.39's laplace_marginal_tol_neg_binomial_2_log_lpmf takes a vector dispersion,
// but its likelihood forms multiply(n_per_group, eta) (a matrix product of two
// G-vectors), and the call aborted at run time for G > 1 with per-gene r; so the NB2
// log likelihood is handed to the generic laplace_marginal_tol as a user function
// (Stan's own Newton solver, autodiff Hessian with block size 1, and log-determinant).
// No parameters: run with the fixed_param sampler (one draw).
functions {
  #include functions/pln.stanfunctions

  /**
   * NegBinomial2 log likelihood of one cell's counts given the latent theta = x - mu:
   * log mean theta + log_mean_offset (= mu - eta_c), dispersions r (per gene).
   */
  real nbln_laplace_log_lik(vector theta, array[] int y, vector log_mean_offset,
                            vector r) {
    return neg_binomial_2_log_lpmf(y | theta + log_mean_offset, r);
  }
}
data {
  int<lower=1> N;  // cells
  int<lower=1> G;  // genes
  int<lower=1, upper=G> K;  // latent rank
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes (unused here; part of the data contract)
  real log_M0;  // (unused here; part of the data contract)
  real<lower=0> sigma_M;  // (unused here; part of the data contract)
  vector[G] mu;
  matrix[G, K] W;
  vector<lower=0>[G] d;
  vector[G] log_r;  // log dispersions
  vector<lower=0>[N] eta;
}
transformed data {
  vector[G] r = exp(log_r);
  vector[G] theta_0 = rep_vector(0, G);  // Newton start
  real tolerance = 1e-12;  // absolute change of the Newton objective
  int max_num_steps = 1000;
  int solver = 1;  // Cholesky of I + W^1/2 Sigma W^1/2
  int max_steps_line_search = 1000;
  int allow_fallthrough = 1;
}
generated quantities {
  vector[N] log_marginal;
  for (c in 1:N) {
    log_marginal[c] = laplace_marginal_tol(
        nbln_laplace_log_lik, (counts[c], mu - eta[c], r), 1, pln_covariance, (W, d),
        (theta_0, tolerance, max_num_steps, solver, max_steps_line_search,
         allow_fallthrough));
  }
}
