// GRN Lyapunov model: a sparse Jacobian J behind Poisson log-normal counts (reference for
// small networks, G <= ~12; scribe_stan/models/grn.py mirrors it in NumPy).
//
//   J[target, regulator] = J_edge[e] on the prior support (E edges), 0 elsewhere;
//   J[g, g] = -gamma_g, log gamma = (log_gamma_free, -sum(log_gamma_free))
//             (mean log degradation rate 0 fixes the scale of (J, D));
//   Sigma solves J Sigma + Sigma J' + 2 diag(D) = 0 (the vectorized Lyapunov equation, a
//             G^2 x G^2 linear solve); Sigma is positive definite exactly when J is
//             stable, so the Cholesky factorization rejects unstable J;
//   eta_c   ~ normal(log_M0 - log_lib_c, sigma_M) truncated to eta_c >= 0
//   x_c     = mu + L z_c, z_c ~ std_normal (L = cholesky(Sigma))
//   u[c, g] ~ poisson(exp(x[c, g] - eta_c))
//
// Priors: mu ~ normal(0, 10) (as pln); J_edge[e] ~ normal(0, edge_scale[e]) with the
// scale from the prior confidence of edge e; log_gamma_free ~ normal(0, 1);
// log D ~ normal(-1, 1.5). Every term is a normalized _lpdf/_lpmf.
functions {
  matrix grn_lyapunov_covariance(matrix J, vector D) {
    int G = rows(J);
    matrix[G * G, G * G] A = rep_matrix(0, G * G, G * G);
    vector[G * G] b = rep_vector(0, G * G);
    matrix[G, G] Sigma;
    // column-major vec: (i, j) -> i + (j - 1) G
    for (j in 1:G) {
      for (i in 1:G) {
        int row = i + (j - 1) * G;
        for (k in 1:G) {
          A[row, k + (j - 1) * G] += J[i, k];  // (J Sigma)[i, j]
          A[row, i + (k - 1) * G] += J[j, k];  // (Sigma J')[i, j]
        }
      }
    }
    for (g in 1:G) {
      b[g + (g - 1) * G] = -2 * D[g];
    }
    Sigma = to_matrix(mdivide_left(A, b), G, G);
    return 0.5 * (Sigma + Sigma');
  }
}
data {
  int<lower=1> N;  // cells
  int<lower=2> G;  // genes
  array[N, G] int<lower=0> counts;
  vector[N] log_lib;  // log library sizes
  real log_M0;  // log prior median total mRNA per cell
  real<lower=0> sigma_M;  // capture prior scale
  int<lower=1> E;  // prior edges (the support of J off the diagonal)
  array[E] int<lower=1, upper=G> edge_target;
  array[E] int<lower=1, upper=G> edge_regulator;
  vector<lower=0>[E] edge_scale;  // prior sd of J[target, regulator]
}
transformed data {
  vector[N] a = log_M0 - log_lib;  // prior location of eta
}
parameters {
  vector[G] mu;
  vector[E] J_edge;
  vector[G - 1] log_gamma_free;
  vector[G] log_D;
  matrix[N, G] z;
  vector<lower=0>[N] eta;
}
transformed parameters {
  vector[G] log_gamma = append_row(log_gamma_free, -sum(log_gamma_free));
  vector[G] D = exp(log_D);
  matrix[G, G] J = diag_matrix(-exp(log_gamma));
  matrix[G, G] Sigma;
  matrix[N, G] x;
  for (e in 1:E) {
    J[edge_target[e], edge_regulator[e]] = J_edge[e];
  }
  Sigma = grn_lyapunov_covariance(J, D);
  x = rep_matrix(mu', N) + z * cholesky_decompose(Sigma)';
}
model {
  target += normal_lpdf(mu | 0, 10);
  target += normal_lpdf(J_edge | 0, edge_scale);
  target += normal_lpdf(log_gamma_free | 0, 1);
  target += normal_lpdf(log_D | -1, 1.5);
  target += std_normal_lpdf(to_vector(z));
  target += normal_lpdf(eta | a, sigma_M) - normal_lccdf(0 | a, sigma_M);
  for (c in 1:N) {
    target += poisson_log_lpmf(counts[c] | x[c]' - eta[c]);
  }
}
generated quantities {
  vector[N] log_lik;
  for (c in 1:N) {
    log_lik[c] = poisson_log_lpmf(counts[c] | x[c]' - eta[c]);
  }
}
