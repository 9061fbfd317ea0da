-- Databases of the example configurations.
CREATE DATABASE app;
CREATE DATABASE replica;
