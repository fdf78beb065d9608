DROP TYPE mood;
