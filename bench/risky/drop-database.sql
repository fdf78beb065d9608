-- dbplan:no-transaction
DROP DATABASE legacy;
