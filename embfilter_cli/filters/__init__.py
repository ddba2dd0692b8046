"""From W_U's spectrum to a filter: solvers, bands, the artifact format and its checks."""
