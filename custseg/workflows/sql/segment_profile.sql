-- Per segment, and over all rows (segment '*'): the row count and, for every feature, the statistics a
-- profile and its effect sizes need (mean, sample variance, quartiles; counts per category).
SELECT coalesce(segment, '*') AS segment, count(*) AS n, {aggregates}
FROM snap
GROUP BY GROUPING SETS ((segment), ())
